//! Where a key is written in a config file: byte offsets from the TOML parser's own spans, so
//! an error points at the key it names, never at the first look-alike in a comment, another
//! table or a longer key (`id` inside `client_id`).

use toml_edit::{ImDocument, Item, Table, Value};

/// One step of a path into the document: a key, or an element of an array (of tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Key(&'static str),
    At(usize),
}

/// A path, relative to where it is used.
pub type KeyPath = Vec<Step>;

enum Cursor<'a> {
    Table(&'a Table),
    Item(&'a Item),
    Value(&'a Value),
}

/// The offset of the deepest part of `path` that `text` holds: the key itself when it is
/// written, else the table it would go in, else 0.
pub fn locate(text: &str, path: &[Step]) -> usize {
    find(text, path, false)
}

/// Like `locate`, but the value's offset when the whole path is written (an error about what
/// a key says points at what it says).
pub fn locate_value(text: &str, path: &[Step]) -> usize {
    find(text, path, true)
}

fn find(text: &str, path: &[Step], value: bool) -> usize {
    let Ok(doc) = ImDocument::parse(text) else {
        return 0;
    };
    let mut best = 0;
    let mut found = 0;
    let mut at = Cursor::Table(doc.as_table());
    for step in path {
        let next = match (step, &at) {
            (Step::Key(k), Cursor::Table(t)) => t
                .get_key_value(k)
                .map(|(key, item)| (key.span().map(|s| s.start), Cursor::Item(item))),
            (Step::Key(k), Cursor::Item(i)) => i
                .as_table_like()
                .and_then(|t| t.get_key_value(k))
                .map(|(key, item)| (key.span().map(|s| s.start), Cursor::Item(item))),
            (Step::Key(k), Cursor::Value(v)) => v
                .as_inline_table()
                .and_then(|t| t.get_key_value(k))
                .map(|(key, item)| (key.span().map(|s| s.start), Cursor::Item(item))),
            (Step::At(n), Cursor::Item(Item::ArrayOfTables(a))) => a
                .get(*n)
                .map(|t| (t.span().map(|s| s.start), Cursor::Table(t))),
            (Step::At(n), Cursor::Item(Item::Value(Value::Array(a))))
            | (Step::At(n), Cursor::Value(Value::Array(a))) => a
                .get(*n)
                .map(|v| (v.span().map(|s| s.start), Cursor::Value(v))),
            _ => None,
        };
        let Some((offset, cursor)) = next else {
            break;
        };
        if let Some(o) = offset {
            best = o;
        }
        found += 1;
        at = cursor;
    }
    if value && found == path.len() {
        let span = match at {
            Cursor::Item(Item::Value(v)) | Cursor::Value(v) => v.span(),
            _ => None,
        };
        if let Some(s) = span {
            return s.start;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_col(text: &str, at: usize) -> (usize, usize) {
        let before = &text[..at];
        let line = before.matches('\n').count() + 1;
        let col = at - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, col)
    }

    #[test]
    fn finds_the_key_not_a_look_alike() {
        let text = "# id = \"in a comment\"\n[uplink]\nclient_id = \"x\"\n\n[gateway]\n  id = \"g\"\n\n[[serial]]\nname = \"a\"\n[[serial]]\nname = \"b\"\nbaud = 0\n\n[mqttsn]\npredefined = [{ id = 1, topic = \"a\" }, { id = 0, topic = \"b\" }]\n";
        let at = |p: &[Step]| line_col(text, locate(text, p));
        assert_eq!(at(&[Step::Key("gateway"), Step::Key("id")]), (6, 3));
        assert_eq!(at(&[Step::Key("uplink"), Step::Key("client_id")]), (3, 1));
        assert_eq!(
            at(&[Step::Key("serial"), Step::At(1), Step::Key("baud")]),
            (12, 1)
        );
        assert_eq!(
            at(&[
                Step::Key("mqttsn"),
                Step::Key("predefined"),
                Step::At(1),
                Step::Key("id")
            ]),
            (15, 42)
        );
        // A key that is not written: the table it belongs in.
        assert_eq!(
            at(&[Step::Key("serial"), Step::At(0), Step::Key("baud")]),
            (8, 1)
        );
        assert_eq!(at(&[Step::Key("store"), Step::Key("max_age")]), (1, 1));
        let v = line_col(
            text,
            locate_value(text, &[Step::Key("serial"), Step::At(1), Step::Key("baud")]),
        );
        assert_eq!(v, (12, 8));
    }
}
