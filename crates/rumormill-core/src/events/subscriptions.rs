//! Who wants what: each member's topics are a value of the replicated
//! store, under `_rumormill/topics/<member>`, written only by that member.
//! Every member (including one that joins later, through anti-entropy)
//! learns everyone's subscriptions; a member that failed or left is no
//! longer live, so its subscriptions no longer count.

use crate::broadcast::RESERVED_PREFIX;

/// Longest topic name, in bytes.
pub const MAX_TOPIC: usize = 255;
/// Most topics one member may subscribe to.
pub const MAX_TOPICS: usize = 1024;

/// The store key holding `member`'s topics.
pub fn topics_key(member: &str) -> String {
    format!("{RESERVED_PREFIX}topics/{member}")
}

/// The member whose topics `key` holds, if it is such a key.
pub fn topics_owner(key: &str) -> Option<&str> {
    key.strip_prefix(RESERVED_PREFIX)?.strip_prefix("topics/")
}

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

/// Topics as stored: sorted, one per line.
pub fn encode(topics: &[String]) -> Vec<u8> {
    topics.join("\n").into_bytes()
}

/// Topics from a stored value (invalid entries are skipped).
pub fn decode(value: &[u8]) -> Vec<String> {
    std::str::from_utf8(value)
        .map(|s| {
            s.split('\n')
                .filter(|t| check_topic(t).is_ok())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a stored value lists `topic`.
pub fn lists(value: &[u8], topic: &str) -> bool {
    std::str::from_utf8(value).is_ok_and(|s| s.split('\n').any(|t| t == topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_and_names_are_checked() {
        let topics = vec!["a".to_owned(), "orders.eu".to_owned()];
        assert_eq!(decode(&encode(&topics)), topics);
        assert!(lists(&encode(&topics), "orders.eu"));
        assert!(!lists(&encode(&topics), "orders"));
        assert!(check_topic("").is_err());
        assert!(check_topic(&"x".repeat(256)).is_err());
        assert!(check_topic("a\nb").is_err());
        assert_eq!(topics_owner(&topics_key("m-1")), Some("m-1"));
        assert_eq!(decode(b"\xff"), Vec::<String>::new());
    }
}
