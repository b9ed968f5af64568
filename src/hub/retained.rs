//! The retained index: the last retained message per topic, in a level tree so that a wildcard
//! SUBSCRIBE visits only the branches its filter can reach.

use std::collections::HashMap;
use std::sync::Arc;

use super::levels::{drop_iteratively, prune, Level};
use super::message::Message;

#[derive(Debug, Default)]
struct Node {
    children: HashMap<String, Node>,
    msg: Option<Arc<Message>>,
}

impl Level for Node {
    fn children(&mut self) -> &mut HashMap<String, Self> {
        &mut self.children
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        drop_iteratively(&mut self.children);
    }
}

/// Retained messages by topic.
#[derive(Debug, Default)]
pub struct RetainedIndex {
    root: Node,
    count: usize,
}

impl RetainedIndex {
    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Stores `msg` as the retained message of its topic, replacing any earlier one.
    pub fn set(&mut self, msg: Arc<Message>) {
        let mut node = &mut self.root;
        for level in msg.topic.split('/') {
            node = node.children.entry(level.to_owned()).or_default();
        }
        if node.msg.replace(msg).is_none() {
            self.count += 1;
        }
    }

    /// Deletes the retained message of `topic` (a retained PUBLISH with an empty payload).
    pub fn remove(&mut self, topic: &str) {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut node = &mut self.root;
        for level in &levels {
            let Some(child) = node.children.get_mut(*level) else {
                return;
            };
            node = child;
        }
        if node.msg.take().is_some() {
            self.count -= 1;
            prune(&mut self.root, &levels, |n| n.msg.is_none());
        }
    }

    /// Every retained message whose topic matches `filter`.
    pub fn matching(&self, filter: &str, out: &mut Vec<Arc<Message>>) {
        let levels: Vec<&str> = filter.split('/').collect();
        walk(&self.root, &levels, 0, out);
    }
}

fn all_below(node: &Node, depth: usize, out: &mut Vec<Arc<Message>>) {
    if let Some(m) = &node.msg {
        out.push(m.clone());
    }
    for (name, child) in &node.children {
        // [MQTT-4.7.2-1] "#" at the first level does not reach $-topics.
        if depth == 0 && name.starts_with('$') {
            continue;
        }
        all_below(child, depth + 1, out);
    }
}

fn walk(node: &Node, levels: &[&str], depth: usize, out: &mut Vec<Arc<Message>>) {
    let Some((level, rest)) = levels.split_first() else {
        if let Some(m) = &node.msg {
            out.push(m.clone());
        }
        return;
    };
    match *level {
        "#" => all_below(node, depth, out),
        "+" => {
            for (name, child) in &node.children {
                if depth == 0 && name.starts_with('$') {
                    continue;
                }
                walk(child, rest, depth + 1, out);
            }
        }
        l => {
            if let Some(child) = node.children.get(l) {
                walk(child, rest, depth + 1, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::message::Origin;
    use crate::proto::{mqtt::QoS, topic};
    use std::time::Instant;

    fn msg(t: &str) -> Arc<Message> {
        Arc::new(Message {
            topic: t.into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Default::default(),
            origin: Origin::Client(Arc::from("c")),
            received_at: Instant::now(),
            expires_at: None,
        })
    }

    #[test]
    fn agrees_with_topic_matches() {
        let topics = ["a", "a/b", "a/b/c", "/x", "$SYS/x", "b", "a/"];
        let mut idx = RetainedIndex::default();
        for t in topics {
            idx.set(msg(t));
        }
        assert_eq!(idx.len(), topics.len());
        for f in [
            "#", "+", "a/#", "a/+", "+/+", "$SYS/#", "+/x", "a/b", "nope/#", "a/+/c",
        ] {
            let mut out = Vec::new();
            idx.matching(f, &mut out);
            let mut got: Vec<String> = out.iter().map(|m| m.topic.clone()).collect();
            got.sort();
            let mut want: Vec<String> = topics
                .iter()
                .filter(|t| topic::matches(f, t))
                .map(|t| t.to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "filter {f}");
        }
        idx.remove("a/b");
        idx.remove("a/b");
        assert_eq!(idx.len(), topics.len() - 1);
        let mut out = Vec::new();
        idx.matching("a/b/c", &mut out);
        assert_eq!(out.len(), 1, "removing a/b keeps a/b/c");
    }

    #[test]
    fn deep_topics_are_removed_and_dropped_without_recursion() {
        let run = || {
            let deep = format!("{}x", "/".repeat(50_000));
            let mut r = RetainedIndex::default();
            r.set(msg(&deep));
            r.set(msg("/y"));
            r.remove(&deep);
            assert_eq!(r.len(), 1);
            assert_eq!(r.root.children[""].children.len(), 1, "only /y is left");
            r.set(msg(&deep));
            drop(r);
        };
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(run)
            .unwrap()
            .join()
            .unwrap();
    }
}
