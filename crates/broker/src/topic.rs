//! Topic names and topic filters: validation and matching (MQTT 3.1.1 §4.7, 5.0 §4.7),
//! and the `$share/{group}/{filter}` form of shared subscriptions (5.0 §4.8.2).
//!
//! [`matches`] is the plain reference matcher: the subscription tree is tested against it.

/// Why a topic name or filter is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Empty (MQTT-4.7.3-1).
    #[error("topic is empty")]
    Empty,
    /// Contains U+0000 (MQTT-4.7.3-2).
    #[error("topic contains a NUL character")]
    Nul,
    /// A topic name with `+` or `#` (MQTT-3.3.2-2).
    #[error("topic name contains a wildcard")]
    WildcardInName,
    /// `#` not alone in the last level, or `+` not alone in its level (MQTT-4.7.1).
    #[error("wildcard not alone in its level, or `#` not last")]
    BadWildcard,
    /// Longer than the broker's `max_topic_length`.
    #[error("topic longer than {0} bytes")]
    TooLong(usize),
    /// More levels than the broker's `max_topic_levels`.
    #[error("topic has more than {0} levels")]
    TooManyLevels(usize),
    /// `$share/` without a valid group name and filter.
    #[error("malformed shared subscription")]
    BadShare,
}

/// Size limits on topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Longest topic name or filter, in bytes.
    pub max_length: usize,
    /// Most levels (`/`-separated parts).
    pub max_levels: usize,
}

impl Default for TopicLimits {
    fn default() -> Self {
        Self {
            max_length: 1024,
            max_levels: 32,
        }
    }
}

fn check_common(topic: &str, limits: TopicLimits) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > limits.max_length {
        return Err(TopicError::TooLong(limits.max_length));
    }
    if topic.contains('\0') {
        return Err(TopicError::Nul);
    }
    if topic.split('/').count() > limits.max_levels {
        return Err(TopicError::TooManyLevels(limits.max_levels));
    }
    Ok(())
}

/// Checks a topic name of a PUBLISH (or will).
pub fn validate_name(topic: &str, limits: TopicLimits) -> Result<(), TopicError> {
    check_common(topic, limits)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter of a SUBSCRIBE (without a `$share/` prefix).
pub fn validate_filter(filter: &str, limits: TopicLimits) -> Result<(), TopicError> {
    check_common(filter, limits)?;
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    for (index, level) in levels.iter().enumerate() {
        let bad_hash = level.contains('#') && (*level != "#" || index != last);
        let bad_plus = level.contains('+') && *level != "+";
        if bad_hash || bad_plus {
            return Err(TopicError::BadWildcard);
        }
    }
    Ok(())
}

/// A subscription filter split into its share group (if any) and the filter proper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFilter<'a> {
    /// `Some(group)` for `$share/{group}/{filter}`.
    pub group: Option<&'a str>,
    /// The filter matched against topic names.
    pub filter: &'a str,
}

/// Splits and validates a SUBSCRIBE filter, shared or not.
pub fn parse_filter(raw: &str, limits: TopicLimits) -> Result<ParsedFilter<'_>, TopicError> {
    if let Some(rest) = raw.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
        if group.is_empty() || group.contains(['+', '#', '\0']) || filter.is_empty() {
            return Err(TopicError::BadShare);
        }
        validate_filter(filter, limits)?;
        return Ok(ParsedFilter {
            group: Some(group),
            filter,
        });
    }
    validate_filter(raw, limits)?;
    Ok(ParsedFilter {
        group: None,
        filter: raw,
    })
}

/// Whether `filter` matches `topic`: level by level, `+` one level, `#` this level and
/// every one below (including the parent), and a leading wildcard never matches a topic
/// starting with `$` (MQTT-4.7.2-1).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_filters_follow_section_4_7() {
        let limits = TopicLimits::default();
        assert!(validate_name("a/b", limits).is_ok());
        assert!(validate_name("/", limits).is_ok());
        assert_eq!(validate_name("", limits), Err(TopicError::Empty));
        assert_eq!(
            validate_name("a/+", limits),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(validate_name("a\0", limits), Err(TopicError::Nul));
        assert!(validate_filter("a/+/#", limits).is_ok());
        assert!(validate_filter("#", limits).is_ok());
        assert!(validate_filter("+", limits).is_ok());
        assert_eq!(
            validate_filter("a/#/b", limits),
            Err(TopicError::BadWildcard)
        );
        assert_eq!(validate_filter("a#", limits), Err(TopicError::BadWildcard));
        assert_eq!(
            validate_filter("a/b+", limits),
            Err(TopicError::BadWildcard)
        );
        let tight = TopicLimits {
            max_length: 5,
            max_levels: 2,
        };
        assert_eq!(validate_name("abcdef", tight), Err(TopicError::TooLong(5)));
        assert_eq!(
            validate_name("a/b/c", tight),
            Err(TopicError::TooManyLevels(2))
        );
    }

    #[test]
    fn shared_subscriptions_parse() {
        let limits = TopicLimits::default();
        let parsed = parse_filter("$share/g1/a/+", limits).unwrap();
        assert_eq!(parsed.group, Some("g1"));
        assert_eq!(parsed.filter, "a/+");
        assert_eq!(parse_filter("$share/g1", limits), Err(TopicError::BadShare));
        assert_eq!(parse_filter("$share//a", limits), Err(TopicError::BadShare));
        assert_eq!(
            parse_filter("$share/g+/a", limits),
            Err(TopicError::BadShare)
        );
        assert_eq!(parse_filter("a/b", limits).unwrap().group, None);
    }

    #[test]
    fn matching_follows_section_4_7_1() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(!matches("a/b", "a/b/c"));
    }
}
