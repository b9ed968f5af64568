//! What the subscription tree and the retained index share: level tries whose depth a client
//! chooses. Walking them must not recurse as deep as a topic, and neither may dropping them.

use std::collections::HashMap;

/// A trie node with one child per topic level.
pub(super) trait Level: Sized {
    fn children(&mut self) -> &mut HashMap<String, Self>;
}

/// After something was removed at the end of `levels`, removes the highest branch on that path
/// that no longer leads to anything (`holds_nothing` says whether a node itself is empty).
pub(super) fn prune<N: Level>(root: &mut N, levels: &[&str], holds_nothing: impl Fn(&N) -> bool) {
    // The shallowest depth from which every node down the path holds nothing but the path.
    let mut cut = None;
    let mut node = &mut *root;
    for (depth, level) in levels.iter().enumerate() {
        let Some(child) = node.children().get_mut(*level) else {
            return;
        };
        let last = depth + 1 == levels.len();
        let only_path = holds_nothing(child) && child.children().len() == usize::from(!last);
        match (only_path, cut) {
            (true, None) => cut = Some(depth),
            (false, _) => cut = None,
            _ => {}
        }
        node = child;
    }
    let Some(cut) = cut else {
        return;
    };
    let mut node = root;
    for level in &levels[..cut] {
        let Some(child) = node.children().get_mut(*level) else {
            return;
        };
        node = child;
    }
    node.children().remove(levels[cut]);
}

/// Empties `children` without recursing: every descendant is dropped childless.
pub(super) fn drop_iteratively<N: Level>(children: &mut HashMap<String, N>) {
    let mut stack: Vec<N> = children.drain().map(|(_, n)| n).collect();
    while let Some(mut n) = stack.pop() {
        stack.extend(n.children().drain().map(|(_, c)| c));
    }
}
