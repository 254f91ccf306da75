use crate::membership::MemberInfo;
use crate::replication::UpdateNotification;

/// How a member changed, as seen by the local member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberChange {
    /// A member was seen for the first time.
    Joined,
    /// A member is suspected of having failed.
    Suspect,
    /// A member was declared failed.
    Failed,
    /// A member left gracefully.
    Left,
    /// A suspected, failed or departed member is alive again (it refuted
    /// the suspicion, or came back).
    Alive,
    /// An alive member changed address or restarted (new boot epoch).
    Updated,
}

/// What the core tells its driver through [`crate::Overlay::poll_notification`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// A membership change.
    Member {
        /// What happened.
        change: MemberChange,
        /// The member after the change.
        member: MemberInfo,
    },
    /// An update from another member was accepted into the store.
    Update(UpdateNotification),
    /// An event on a topic the local member subscribes to (once per event).
    Event(crate::events::Event),
    /// The final outcome of a published at-least-once event for one subscriber.
    Report(crate::events::DeliveryReport),
    /// The store's first anti-entropy exchange after a join has completed:
    /// it holds at least what the partner held (who subscribes to what,
    /// above all). Reported once per [`crate::Overlay::join`] (not for
    /// [`crate::Overlay::contact`]), and never when anti-entropy is off.
    StoreSynced,
    /// Key rotation: the keyring changed (save it), or a desired keyring
    /// was refused or could not be followed in full.
    Keys(crate::keys::KeysNotification),
    /// Racks: a Raft record to make durable, then to acknowledge with
    /// [`crate::Overlay::raft_persisted`] (the messages that depend on it
    /// wait until then).
    Raft(crate::racks::RaftRecord),
    /// Racks: a gateway changed, a rack became unreachable or reachable.
    Rack(crate::racks::RackNotification),
}
