//! The subscription tree: topic filters stored level by level, so matching a topic
//! costs its depth times the wildcards on the way, not one comparison per subscription.
//!
//! Invariants: a node exists only while a subscription ends at or below it (removal
//! prunes empty branches); a client holds at most one subscription per (share group,
//! filter); `+` and `#` in the first level never match a topic starting with `$`.
//! Tested against [`crate::topic::matches`] by a model-based property test.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Who holds a subscription: a client, in a share group or alone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubscriberKey {
    /// `Some(group)` for `$share/{group}/...`.
    pub group: Option<Arc<str>>,
    /// Client identifier.
    pub client: Arc<str>,
}

/// What a subscription asked for (MQTT 5.0 §3.8.3.1; 3.1.1 uses only `qos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    /// Highest QoS delivered.
    pub qos: u8,
    /// Do not deliver the client's own publishes.
    pub no_local: bool,
    /// Keep the RETAIN flag of forwarded publishes.
    pub retain_as_published: bool,
    /// Subscription identifier sent with matching publishes.
    pub subscription_id: Option<u32>,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    subscribers: BTreeMap<SubscriberKey, SubOptions>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty()
    }
}

/// Every subscription of the broker.
#[derive(Debug, Default)]
pub struct SubscriptionTree {
    root: Node,
    count: usize,
}

impl SubscriptionTree {
    /// Adds or replaces the subscription of `key` to `filter` (already validated);
    /// returns true when it replaced one.
    pub fn insert(&mut self, filter: &str, key: SubscriberKey, options: SubOptions) -> bool {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(Box::from(level)).or_default();
        }
        let replaced = node.subscribers.insert(key, options).is_some();
        if !replaced {
            self.count += 1;
        }
        replaced
    }

    /// Removes `key`'s subscription to `filter`; returns true when there was one.
    pub fn remove(&mut self, filter: &str, key: &SubscriberKey) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, key);
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Number of subscriptions held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no subscription is held.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Every subscription whose filter matches `topic`, with its options.
    pub fn matching(&self, topic: &str) -> Vec<(SubscriberKey, SubOptions)> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut found = Vec::new();
        let dollar = topic.starts_with('$');
        collect(&self.root, &levels, dollar, &mut found);
        found
    }
}

fn remove_at(node: &mut Node, levels: &[&str], key: &SubscriberKey) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return node.subscribers.remove(key).is_some();
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove_at(child, rest, key);
    if child.is_empty() {
        node.children.remove(*first);
    }
    removed
}

fn push_all(node: &Node, found: &mut Vec<(SubscriberKey, SubOptions)>) {
    found.extend(
        node.subscribers
            .iter()
            .map(|(key, options)| (key.clone(), *options)),
    );
}

/// `skip_wildcards`: the topic starts with `$` and this is the first level.
fn collect(
    node: &Node,
    levels: &[&str],
    skip_wildcards: bool,
    found: &mut Vec<(SubscriberKey, SubOptions)>,
) {
    if !skip_wildcards {
        if let Some(hash) = node.children.get("#") {
            // `a/#` matches `a` itself as well as everything below it.
            push_all(hash, found);
        }
    }
    let Some((first, rest)) = levels.split_first() else {
        push_all(node, found);
        return;
    };
    if !skip_wildcards {
        if let Some(plus) = node.children.get("+") {
            collect(plus, rest, false, found);
        }
    }
    if *first != "+" && *first != "#" {
        if let Some(exact) = node.children.get(*first) {
            collect(exact, rest, false, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::topic::matches;

    fn key(client: &str, group: Option<&str>) -> SubscriberKey {
        SubscriberKey {
            group: group.map(Arc::from),
            client: Arc::from(client),
        }
    }

    const OPTIONS: SubOptions = SubOptions {
        qos: 1,
        no_local: false,
        retain_as_published: false,
        subscription_id: None,
    };

    #[test]
    fn parent_matches_hash_and_dollar_topics_skip_leading_wildcards() {
        let mut tree = SubscriptionTree::default();
        tree.insert("a/#", key("c1", None), OPTIONS);
        tree.insert("#", key("c2", None), OPTIONS);
        tree.insert("+/x", key("c3", None), OPTIONS);
        tree.insert("$SYS/#", key("c4", None), OPTIONS);
        let clients = |topic: &str| -> BTreeSet<String> {
            tree.matching(topic)
                .into_iter()
                .map(|(key, _)| key.client.to_string())
                .collect()
        };
        assert_eq!(clients("a"), ["c1", "c2"].map(String::from).into());
        assert_eq!(clients("$SYS/x"), ["c4"].map(String::from).into());
        assert_eq!(clients("b/x"), ["c2", "c3"].map(String::from).into());
        assert!(tree.remove("a/#", &key("c1", None)));
        assert!(!tree.remove("a/#", &key("c1", None)));
        assert_eq!(tree.len(), 3);
    }

    fn level() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "$s", "", "+", "#"])
    }

    fn filter() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..4).prop_map(|levels| {
            // `#` only last: cut the filter after the first one.
            let mut kept = Vec::new();
            for level in levels {
                kept.push(level);
                if level == "#" {
                    break;
                }
            }
            kept.join("/")
        })
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "$s", ""]), 1..4)
            .prop_map(|levels| levels.join("/"))
    }

    #[derive(Debug, Clone)]
    enum Op {
        Subscribe(u8, Option<u8>, String),
        Unsubscribe(u8, Option<u8>, String),
    }

    fn op() -> impl Strategy<Value = Op> {
        let who = || (0u8..3, prop::option::of(0u8..2), filter());
        prop_oneof![
            who().prop_map(|(client, group, filter)| Op::Subscribe(client, group, filter)),
            who().prop_map(|(client, group, filter)| Op::Unsubscribe(client, group, filter)),
        ]
    }

    proptest! {
        /// The tree matches exactly what the reference matcher matches over the same
        /// set of subscriptions, through any sequence of subscribes and unsubscribes.
        #[test]
        fn tree_matches_like_the_reference(ops in prop::collection::vec(op(), 0..40), topics in prop::collection::vec(topic(), 1..10)) {
            let mut tree = SubscriptionTree::default();
            let mut model: BTreeSet<(SubscriberKey, String)> = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Subscribe(client, group, filter) => {
                        let key = key(&format!("c{client}"), group.map(|g| format!("g{g}")).as_deref());
                        let replaced = tree.insert(&filter, key.clone(), OPTIONS);
                        prop_assert_eq!(replaced, !model.insert((key, filter)));
                    }
                    Op::Unsubscribe(client, group, filter) => {
                        let key = key(&format!("c{client}"), group.map(|g| format!("g{g}")).as_deref());
                        let removed = tree.remove(&filter, &key);
                        prop_assert_eq!(removed, model.remove(&(key, filter)));
                    }
                }
                prop_assert_eq!(tree.len(), model.len());
            }
            for topic in topics {
                let mut got: Vec<SubscriberKey> = tree.matching(&topic).into_iter().map(|(key, _)| key).collect();
                got.sort();
                let mut expected: Vec<SubscriberKey> = model
                    .iter()
                    .filter(|(_, filter)| matches(filter, &topic))
                    .map(|(key, _)| key.clone())
                    .collect();
                expected.sort();
                prop_assert_eq!(got, expected, "topic {:?}", topic);
            }
            // Removing everything leaves no node behind.
            for (key, filter) in model {
                tree.remove(&filter, &key);
            }
            prop_assert!(tree.root.is_empty());
        }
    }
}
