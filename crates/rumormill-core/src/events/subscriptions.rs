//! Who wants what: each member's topics are a value of the replicated
//! store, under `_rumormill/topics/<member>`, written only by that member
//! (the key and its [`Topics`] value belong to [`crate::reserved`]).
//! Every member (including one that joins later, through anti-entropy)
//! learns everyone's subscriptions; a member that failed or left is no
//! longer live, so its subscriptions no longer count.
//!
//! [`Topics`]: crate::reserved::Topics

/// Longest topic name, in bytes.
pub const MAX_TOPIC: usize = 255;
/// Most topics one member may subscribe to.
pub const MAX_TOPICS: usize = 1024;

/// Checks a topic name: 1 to [`MAX_TOPIC`] bytes, no control characters.
pub fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("a topic name cannot be empty".into());
    }
    if topic.len() > MAX_TOPIC {
        return Err(format!("topic name of {} bytes: at most {MAX_TOPIC}", topic.len()));
    }
    if topic.chars().any(char::is_control) {
        return Err(format!("topic name {topic:?} has control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_and_names_are_checked() {
        use crate::reserved::{ReservedKey, Topics};
        let topics = Topics(vec!["a".to_owned(), "orders.eu".to_owned()]);
        assert_eq!(Topics::decode(&topics.encode()), Ok(topics.clone()));
        assert!(topics.lists("orders.eu"));
        assert!(!topics.lists("orders"));
        assert!(check_topic("").is_err());
        assert!(check_topic(&"x".repeat(256)).is_err());
        assert!(check_topic("a\nb").is_err());
        let key = ReservedKey::Topics { member: "m-1".into() };
        assert_eq!(
            ReservedKey::parse(&key.key()).as_ref().map(ReservedKey::member),
            Some("m-1")
        );
        assert!(Topics::decode(b"\xff").is_err());
    }
}
