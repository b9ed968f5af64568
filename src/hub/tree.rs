//! The subscription tree: one node per topic level, wildcards as ordinary children, shared
//! groups kept apart from plain subscribers. Matching walks only the branches a topic can reach.

use std::collections::HashMap;
use std::sync::Arc;

use super::levels::prune;
use crate::proto::mqtt::SubOptions;

/// One subscription as the tree stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sub {
    pub options: SubOptions,
    /// The v5 Subscription Identifier given with SUBSCRIBE.
    pub id: Option<u32>,
}

#[derive(Debug, Default)]
struct SharedGroup {
    members: Vec<(Arc<str>, Sub)>,
    /// Round-robin cursor.
    next: usize,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<String, Node>,
    subs: HashMap<Arc<str>, Sub>,
    shared: HashMap<String, SharedGroup>,
}

impl Node {
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subs.is_empty() && self.shared.is_empty()
    }
}

impl super::levels::Level for Node {
    fn children(&mut self) -> &mut HashMap<String, Self> {
        &mut self.children
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        super::levels::drop_iteratively(&mut self.children);
    }
}

/// A subscriber that a published topic reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub client: Arc<str>,
    pub sub: Sub,
    /// True when chosen from a shared group (at most one member per group gets the message).
    pub shared: bool,
}

/// All subscriptions of all sessions.
#[derive(Debug, Default)]
pub struct SubscriptionTree {
    root: Node,
    count: usize,
}

impl SubscriptionTree {
    /// Number of (client, filter) subscriptions held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when nobody subscribes to anything.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds or replaces a subscription. Returns true when it did not exist before.
    pub fn insert(
        &mut self,
        group: Option<&str>,
        filter: &str,
        client: &Arc<str>,
        sub: Sub,
    ) -> bool {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.to_owned()).or_default();
        }
        let new = match group {
            None => node.subs.insert(client.clone(), sub).is_none(),
            Some(g) => {
                let grp = node.shared.entry(g.to_owned()).or_default();
                match grp.members.iter_mut().find(|(c, _)| c == client) {
                    Some(m) => {
                        m.1 = sub;
                        false
                    }
                    None => {
                        grp.members.push((client.clone(), sub));
                        true
                    }
                }
            }
        };
        if new {
            self.count += 1;
        }
        new
    }

    /// Removes a subscription. Returns true when it existed. Empty branches are pruned.
    ///
    /// Iterative, like the tree's drop: a client chooses the depth of its filter, and a
    /// recursion as deep as a 7,000-level filter overflows the stack.
    pub fn remove(&mut self, group: Option<&str>, filter: &str, client: &str) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut node = &mut self.root;
        for level in &levels {
            let Some(child) = node.children.get_mut(*level) else {
                return false;
            };
            node = child;
        }
        let removed = match group {
            None => node.subs.remove(client).is_some(),
            Some(g) => {
                let Some(grp) = node.shared.get_mut(g) else {
                    return false;
                };
                let before = grp.members.len();
                grp.members.retain(|(c, _)| &**c != client);
                let removed = grp.members.len() != before;
                if grp.members.is_empty() {
                    node.shared.remove(g);
                }
                removed
            }
        };
        if removed {
            self.count -= 1;
            prune(&mut self.root, &levels, |n| {
                n.subs.is_empty() && n.shared.is_empty()
            });
        }
        removed
    }

    /// Every subscriber whose filter matches `topic`. For each shared group one member is
    /// chosen round-robin, preferring members for which `online` is true.
    pub fn matches(&mut self, topic: &str, online: impl Fn(&str) -> bool, out: &mut Vec<Match>) {
        let levels: Vec<&str> = topic.split('/').collect();
        // [MQTT-4.7.2-1] wildcards at the first level do not match $-topics.
        let dollar = topic.starts_with('$');
        walk(&mut self.root, &levels, 0, dollar, &online, out);
    }
}

fn collect(node: &mut Node, online: &impl Fn(&str) -> bool, out: &mut Vec<Match>) {
    for (c, s) in &node.subs {
        out.push(Match {
            client: c.clone(),
            sub: *s,
            shared: false,
        });
    }
    for grp in node.shared.values_mut() {
        let n = grp.members.len();
        if n == 0 {
            continue;
        }
        let start = grp.next % n;
        // Prefer an online member; fall back to the round-robin one (its session queues it).
        let pick = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| online(&grp.members[i].0))
            .unwrap_or(start);
        grp.next = pick + 1;
        let (c, s) = &grp.members[pick];
        out.push(Match {
            client: c.clone(),
            sub: *s,
            shared: true,
        });
    }
}

fn walk(
    node: &mut Node,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    online: &impl Fn(&str) -> bool,
    out: &mut Vec<Match>,
) {
    let wild_ok = !(dollar && depth == 0);
    if wild_ok {
        if let Some(hash) = node.children.get_mut("#") {
            // "a/#" also matches "a" itself, so "#" is checked before the level is consumed.
            collect(hash, online, out);
        }
    }
    let Some((level, rest)) = levels.split_first() else {
        collect(node, online, out);
        return;
    };
    if wild_ok {
        if let Some(plus) = node.children.get_mut("+") {
            walk(plus, rest, depth + 1, dollar, online, out);
        }
    }
    if *level != "+" && *level != "#" {
        if let Some(child) = node.children.get_mut(*level) {
            walk(child, rest, depth + 1, dollar, online, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::topic;

    fn sub() -> Sub {
        Sub {
            options: SubOptions::default(),
            id: None,
        }
    }

    /// The tree must agree with the plain matcher on every pair.
    #[test]
    fn agrees_with_topic_matches() {
        let filters = [
            "a/b", "a/+", "a/#", "#", "+/+", "+", "/+", "$SYS/#", "+/b", "a/b/c", "$SYS/+", "+/#",
        ];
        let topics = [
            "a/b", "a", "a/b/c", "/x", "x", "$SYS/x", "$SYS", "b/b", "a/",
        ];
        let mut t = SubscriptionTree::default();
        for f in filters {
            let c: Arc<str> = Arc::from(f);
            t.insert(None, f, &c, sub());
        }
        for name in topics {
            let mut out = Vec::new();
            t.matches(name, |_| true, &mut out);
            let mut got: Vec<String> = out.iter().map(|m| m.client.to_string()).collect();
            got.sort();
            let mut want: Vec<String> = filters
                .iter()
                .filter(|f| topic::matches(f, name))
                .map(|f| f.to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "topic {name}");
        }
    }

    #[test]
    fn shared_round_robin_prefers_online_and_prunes() {
        let mut t = SubscriptionTree::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        assert!(t.insert(Some("g"), "x/+", &a, sub()));
        assert!(t.insert(Some("g"), "x/+", &b, sub()));
        assert!(!t.insert(Some("g"), "x/+", &b, sub()));
        let mut seen = Vec::new();
        for _ in 0..4 {
            let mut out = Vec::new();
            t.matches("x/1", |_| true, &mut out);
            assert_eq!(out.len(), 1);
            seen.push(out[0].client.to_string());
        }
        assert_eq!(seen, ["a", "b", "a", "b"]);
        let mut out = Vec::new();
        t.matches("x/1", |c| c == "b", &mut out);
        t.matches("x/1", |c| c == "b", &mut out);
        assert!(out.iter().all(|m| &*m.client == "b"));
        assert!(t.remove(Some("g"), "x/+", "a"));
        assert!(t.remove(Some("g"), "x/+", "b"));
        assert!(t.is_empty());
        assert!(t.root.is_empty(), "empty branches are pruned");
    }

    /// A client picks its filter's depth: removing (and dropping) a deep branch must not
    /// recurse once per level. Run on a small stack, where a recursion of this depth overflows.
    #[test]
    fn deep_filters_are_removed_and_dropped_without_recursion() {
        let run = || {
            let deep = format!("{}#", "/".repeat(50_000));
            let c: Arc<str> = Arc::from("c");
            let mut t = SubscriptionTree::default();
            assert!(t.insert(None, &deep, &c, sub()));
            assert!(t.insert(None, "/x", &c, sub()));
            assert!(t.remove(None, &deep, "c"));
            assert_eq!(t.len(), 1);
            assert_eq!(t.root.children[""].children.len(), 1, "only /x is left");
            assert!(t.insert(None, &deep, &c, sub()));
            drop(t);
        };
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(run)
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn pruning_keeps_branches_that_still_hold_something() {
        let c: Arc<str> = Arc::from("c");
        let mut t = SubscriptionTree::default();
        t.insert(None, "a/b/c/d", &c, sub());
        t.insert(None, "a/b", &c, sub());
        t.insert(Some("g"), "a/b/c", &c, sub());
        assert!(t.remove(None, "a/b/c/d", "c"));
        let mut out = Vec::new();
        t.matches("a/b/c", |_| true, &mut out);
        assert_eq!(out.len(), 1, "the shared group at a/b/c survives");
        assert!(t.remove(Some("g"), "a/b/c", "c"));
        assert!(t.root.children["a"].children["b"].children.is_empty());
        assert!(t.remove(None, "a/b", "c"));
        assert!(t.root.is_empty());
        assert!(!t.remove(None, "a/b", "c"));
    }
}
