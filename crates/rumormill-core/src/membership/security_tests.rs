//! The membership protocol over encrypted packets.

use std::time::Duration;

use crate::testkit::{Net, addr};
use crate::{Config, FrameKind, Keyring, MemberState, Overlay, Security, WireError};
use rumormill_wire::HEADER_LEN;

const OLD: [u8; 32] = [1; 32];
const NEW: [u8; 24] = [2; 24];

fn encrypted() -> Security {
    Security::Encrypted(Keyring::new(&OLD).expect("a 32-byte key"))
}

#[test]
fn an_encrypted_overlay_converges_and_detects_failures() {
    let mut net = Net::with_security(5, Config::new_lan(), encrypted);
    net.run_for(Duration::from_secs(5));
    assert!(net.all_alive());
    net.kill(4);
    net.run_for(Duration::from_secs(30));
    assert_eq!(net.state_at(0, 4), Some(MemberState::Failed));
    assert_eq!(net.node(1).stats().rejected, 0);
}

#[test]
fn keys_rotate_with_traffic_flowing_and_nothing_rejected() {
    let mut net = Net::with_security(4, Config::new_lan(), encrypted);
    net.run_for(Duration::from_secs(5));
    // 1. Install the new key everywhere, one member at a time, traffic flowing.
    let mut id = 0;
    for i in 0..4 {
        id = net.node(i).install_key(&NEW).expect("installs");
        net.run_for(Duration::from_millis(700));
    }
    // 2. Make it primary everywhere, one at a time: the others still hold both.
    for i in 0..4 {
        net.node(i).use_key(id).expect("installed");
        net.run_for(Duration::from_millis(700));
    }
    // 3. Remove the old key everywhere.
    let old = rumormill_wire::key_id(&OLD);
    for i in 0..4 {
        net.node(i).remove_key(old).expect("not primary");
        net.run_for(Duration::from_millis(700));
    }
    net.run_for(Duration::from_secs(10));
    for i in 0..4 {
        let o = net.node(i);
        assert_eq!(o.stats().rejected, 0, "n{i} rejected {:?}", o.stats().last_rejection);
        let keys = o.keys().expect("encrypted");
        assert_eq!((keys.len(), keys[0].id, keys[0].primary), (1, id, true));
    }
    assert!(net.all_alive());
    assert_eq!(
        net.node(0).remove_key(id),
        Err(crate::CoreError::Key(WireError::RemovePrimary(id)))
    );
}

#[test]
fn garbage_and_foreign_keys_are_counted_and_dropped() {
    let mut net = Net::with_security(2, Config::new_lan(), encrypted);
    net.run_for(Duration::from_secs(3));
    net.raw(0, addr(50), FrameKind::Datagram, b"too short");
    let stats = net.node(0).stats().clone();
    assert_eq!(
        (stats.rejected, stats.last_rejection),
        (
            1,
            Some(WireError::Truncated {
                len: 9,
                min: HEADER_LEN
            })
        )
    );
    net.raw(0, addr(50), FrameKind::Datagram, &[b'x'; 64]);
    assert_eq!(net.node(0).stats().last_rejection, Some(WireError::BadMagic));
    // A member of the same overlay with another key.
    let now = net.now;
    let foreign_key = Security::Encrypted(Keyring::new(&[9u8; 16]).expect("a 16-byte key"));
    let mut stranger = Overlay::new(
        Config::new_lan(),
        crate::Identity::new("x", addr(51), 1),
        foreign_key,
        1,
        now,
    );
    stranger.join(now, &[addr(0)]).expect("active");
    let t = stranger.poll_transmit().expect("a join request");
    net.raw(0, addr(51), t.kind, &t.payload);
    assert!(matches!(
        net.node(0).stats().last_rejection,
        Some(WireError::UnknownKey(_))
    ));
    assert!(net.node(0).member("x").is_none());
    // Plain text on an encrypted overlay.
    let mut plain = Overlay::new(
        Config::new_lan(),
        crate::Identity::new("p", addr(52), 1),
        Security::Plaintext,
        1,
        now,
    );
    plain.join(now, &[addr(0)]).expect("active");
    let t = plain.poll_transmit().expect("a join request");
    net.raw(0, addr(52), t.kind, &t.payload);
    assert_eq!(net.node(0).stats().last_rejection, Some(WireError::PlaintextRejected));
    assert_eq!(net.node(0).stats().rejected, 4);
    // The overlay is unaffected.
    net.run_for(Duration::from_secs(5));
    assert!(net.all_alive());
}
