//! Who may publish and subscribe where.
//!
//! Under `auth = "registry"` a device publishes only its own events (the
//! `device_topic` with its id) and its command results
//! (`devices/{device}/command_results`), and subscribes only to its own commands
//! (`devices/{device}/commands`). Other modes allow every topic.

use fieldgate_broker::topic::matches;

use super::device_topic::DeviceTopic;

/// The topic a device's commands are published on.
pub fn commands_topic(device: &str) -> String {
    format!("devices/{device}/commands")
}

/// The topic a device publishes its command results on.
pub fn results_topic(device: &str) -> String {
    format!("devices/{device}/command_results")
}

/// The ACL of one connection.
#[derive(Debug, Clone)]
pub enum Acl {
    /// Every topic (auth `none` or `token`).
    Open,
    /// A registry device's own topics.
    Device {
        /// Filter of its event topics.
        events: String,
        /// Its command results topic.
        results: String,
        /// Its commands topic.
        commands: String,
    },
}

impl Acl {
    /// The ACL of a registry device.
    pub fn device(device: &str, pattern: &DeviceTopic) -> Self {
        Acl::Device {
            events: pattern.filter_for(device),
            results: results_topic(device),
            commands: commands_topic(device),
        }
    }

    /// May it publish on `topic`?
    pub fn may_publish(&self, topic: &str) -> bool {
        match self {
            Acl::Open => true,
            Acl::Device {
                events, results, ..
            } => topic == results || matches(events, topic),
        }
    }

    /// May it subscribe to `filter` (without a share prefix)?
    pub fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Acl::Open => true,
            Acl::Device { commands, .. } => filter == commands,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_publishes_and_subscribes_only_its_own_topics() {
        let pattern = DeviceTopic::parse("devices/{device}/{kind}").unwrap();
        let acl = Acl::device("d1", &pattern);
        assert!(acl.may_publish("devices/d1/telemetry"));
        assert!(acl.may_publish("devices/d1/command_results"));
        assert!(!acl.may_publish("devices/d2/telemetry"));
        assert!(!acl.may_publish("other"));
        assert!(acl.may_subscribe("devices/d1/commands"));
        assert!(!acl.may_subscribe("devices/+/commands"));
        assert!(!acl.may_subscribe("#"));
        assert!(Acl::Open.may_subscribe("#"));
    }
}
