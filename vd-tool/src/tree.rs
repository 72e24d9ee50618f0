//! Human text for any `Serialize` value: the typed facts backends report
//! ([`vd_core::Facts`]) become an indented tree of `name: value` lines.
//!
//! The value is first serialised into a [`Node`] tree through serde's data model, then
//! written out. Struct and map fields are lines; a list of plain values is one line; a list of
//! records is one `- ` item per record, on one line when every field is a plain value (so a
//! region or metadata item reads as one line). [`vd_core::Offset`] prints in hex and
//! [`vd_core::ByteSize`] with a binary unit; `None`, unit values and empty lists and records are
//! left out. Strings are sanitised: an image cannot drive the terminal.

use std::fmt;
use std::io::{self, Write};

use serde::Serialize;
use serde::ser::{self, Impossible};

use crate::render::{human_size, sanitize};

/// A serialised value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A number, string, boolean or enum variant, as text.
    Leaf(String),
    /// A sequence.
    List(Vec<Node>),
    /// Named fields in order: a struct or a map.
    Record(Vec<(String, Node)>),
    /// Nothing to show (`None`, `()`).
    Absent,
}

impl Node {
    /// `value` as a tree.
    ///
    /// # Errors
    /// The value's own serialisation errors, and maps whose keys are not plain values.
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Result<Self, TreeError> {
        value.serialize(NodeSerializer)
    }

    fn is_empty(&self) -> bool {
        match self {
            Self::Leaf(_) => false,
            Self::List(items) => items.is_empty(),
            Self::Record(fields) => fields.iter().all(|(_, v)| v.is_empty()),
            Self::Absent => true,
        }
    }

    fn is_leaf(&self) -> bool {
        matches!(self, Self::Leaf(_))
    }

    /// Whether a record field with this value is written on the field name's line.
    fn is_inline(&self) -> bool {
        match self {
            Self::Leaf(_) => true,
            Self::List(items) => !items.is_empty() && items.iter().all(Self::is_leaf),
            _ => false,
        }
    }
}

/// Writes `node` as lines indented by `indent` spaces.
///
/// # Errors
/// Errors of `out`.
pub fn write_tree(out: &mut dyn Write, node: &Node, indent: usize) -> io::Result<()> {
    for line in lines(node, indent) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn lines(node: &Node, indent: usize) -> Vec<String> {
    let pad = " ".repeat(indent);
    match node {
        Node::Absent => Vec::new(),
        Node::Leaf(s) => vec![format!("{pad}{}", sanitize(s))],
        Node::List(items) => items.iter().flat_map(|i| item_lines(i, indent)).collect(),
        Node::Record(fields) => {
            let mut out = Vec::new();
            let shown = || fields.iter().filter(|(_, v)| !v.is_empty());
            // Values on the name's line start in one column.
            let width = shown()
                .filter(|(_, v)| v.is_inline())
                .map(|(name, _)| sanitize(name).chars().count() + 1)
                .max()
                .unwrap_or(0);
            for (name, value) in shown() {
                let name = sanitize(name);
                let label = format!("{name}:");
                match value {
                    Node::Leaf(s) => out.push(format!("{pad}{label:<width$} {}", sanitize(s))),
                    Node::List(items) if items.iter().all(Node::is_leaf) => {
                        let joined: Vec<String> = items.iter().map(leaf_text).collect();
                        out.push(format!("{pad}{label:<width$} {}", joined.join(", ")));
                    }
                    _ => {
                        out.push(format!("{pad}{name}:"));
                        out.extend(lines(value, indent + 2));
                    }
                }
            }
            out
        }
    }
}

/// The most fields a record of plain values shows on its item's one line; longer records take
/// a line per field.
const ONE_LINE_FIELDS: usize = 6;

/// One item of a list: `- value`, a short record of plain values on one line, or a nested record
/// whose first line carries the dash.
fn item_lines(item: &Node, indent: usize) -> Vec<String> {
    let pad = " ".repeat(indent);
    match item {
        Node::Record(fields)
            if fields
                .iter()
                .all(|(_, v)| v.is_leaf() || matches!(v, Node::Absent))
                && fields.iter().filter(|(_, v)| v.is_leaf()).count() <= ONE_LINE_FIELDS =>
        {
            let parts: Vec<String> = fields
                .iter()
                .filter(|(_, v)| v.is_leaf())
                .map(|(k, v)| format!("{}: {}", sanitize(k), leaf_text(v)))
                .collect();
            vec![format!("{pad}- {}", parts.join(", "))]
        }
        _ => {
            let mut out = lines(item, indent + 2);
            match out.first_mut() {
                Some(first) => first.replace_range(..indent + 2, &format!("{pad}- ")),
                None => out.push(format!("{pad}-")),
            }
            out
        }
    }
}

fn leaf_text(node: &Node) -> String {
    match node {
        Node::Leaf(s) => sanitize(s),
        _ => String::new(),
    }
}

/// Why a value could not become a tree.
#[derive(Debug)]
pub struct TreeError(String);

impl fmt::Display for TreeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TreeError {}

impl ser::Error for TreeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

/// Serialises a value into a [`Node`].
struct NodeSerializer;

fn leaf(v: impl ToString) -> Result<Node, TreeError> {
    Ok(Node::Leaf(v.to_string()))
}

/// The `serialize_*` methods of plain values (numbers, booleans, characters, strings): each
/// value's text, passed through `$wrap`.
macro_rules! plain_values {
    ($ok:ty, $wrap:expr) => {
        plain_values!($ok, $wrap; serialize_bool: bool, serialize_i8: i8, serialize_i16: i16,
            serialize_i32: i32, serialize_i64: i64, serialize_u8: u8, serialize_u16: u16,
            serialize_u32: u32, serialize_u64: u64, serialize_f32: f32, serialize_f64: f64,
            serialize_char: char, serialize_str: &str);
    };
    ($ok:ty, $wrap:expr; $($method:ident: $ty:ty),*) => {
        $(
            fn $method(self, v: $ty) -> Result<$ok, TreeError> {
                Ok($wrap(v.to_string()))
            }
        )*
    };
}

impl ser::Serializer for NodeSerializer {
    type Ok = Node;
    type Error = TreeError;
    type SerializeSeq = ListBuilder;
    type SerializeTuple = ListBuilder;
    type SerializeTupleStruct = ListBuilder;
    type SerializeTupleVariant = ListBuilder;
    type SerializeMap = RecordBuilder;
    type SerializeStruct = RecordBuilder;
    type SerializeStructVariant = RecordBuilder;

    plain_values!(Node, Node::Leaf);
    fn serialize_bytes(self, v: &[u8]) -> Result<Node, TreeError> {
        leaf(v.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }
    fn serialize_none(self) -> Result<Node, TreeError> {
        Ok(Node::Absent)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Node, TreeError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Node, TreeError> {
        Ok(Node::Absent)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Node, TreeError> {
        Ok(Node::Absent)
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Node, TreeError> {
        leaf(variant)
    }

    /// [`vd_core::Offset`] in hex, [`vd_core::ByteSize`] with a unit; other newtypes as their
    /// content.
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<Node, TreeError> {
        let node = value.serialize(self)?;
        let number = match &node {
            Node::Leaf(s) => s.parse::<u64>().ok(),
            _ => None,
        };
        Ok(match (name, number) {
            (vd_core::Offset::NAME, Some(n)) => Node::Leaf(format!("{n:#x}")),
            (vd_core::ByteSize::NAME, Some(n)) => Node::Leaf(human_size(n)),
            _ => node,
        })
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Node, TreeError> {
        Ok(Node::Record(vec![(variant.to_string(), Node::of(value)?)]))
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<ListBuilder, TreeError> {
        Ok(ListBuilder::new(None, len))
    }
    fn serialize_tuple(self, len: usize) -> Result<ListBuilder, TreeError> {
        Ok(ListBuilder::new(None, Some(len)))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<ListBuilder, TreeError> {
        Ok(ListBuilder::new(None, Some(len)))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<ListBuilder, TreeError> {
        Ok(ListBuilder::new(Some(variant), Some(len)))
    }
    fn serialize_map(self, len: Option<usize>) -> Result<RecordBuilder, TreeError> {
        Ok(RecordBuilder::new(None, len))
    }
    fn serialize_struct(self, _name: &'static str, len: usize) -> Result<RecordBuilder, TreeError> {
        Ok(RecordBuilder::new(None, Some(len)))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<RecordBuilder, TreeError> {
        Ok(RecordBuilder::new(Some(variant), Some(len)))
    }
}

/// Wraps `node` as `{variant: node}` for enum variants.
fn in_variant(variant: Option<&'static str>, node: Node) -> Node {
    match variant {
        Some(v) => Node::Record(vec![(v.to_string(), node)]),
        None => node,
    }
}

/// Builds a [`Node::List`].
struct ListBuilder {
    variant: Option<&'static str>,
    items: Vec<Node>,
}

impl ListBuilder {
    fn new(variant: Option<&'static str>, len: Option<usize>) -> Self {
        // The hint comes from the value, not from an image; bounded anyway.
        Self {
            variant,
            items: Vec::with_capacity(len.unwrap_or(0).min(1024)),
        }
    }

    fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TreeError> {
        self.items.push(Node::of(value)?);
        Ok(())
    }

    fn finish(self) -> Node {
        in_variant(self.variant, Node::List(self.items))
    }
}

/// `SerializeSeq` and its tuple kin for [`ListBuilder`]: each element is pushed.
macro_rules! list_builder {
    ($($trait:ident :: $method:ident),*) => {
        $(
            impl ser::$trait for ListBuilder {
                type Ok = Node;
                type Error = TreeError;
                fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TreeError> {
                    self.push(value)
                }
                fn end(self) -> Result<Node, TreeError> {
                    Ok(self.finish())
                }
            }
        )*
    };
}

list_builder!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

/// Builds a [`Node::Record`].
struct RecordBuilder {
    variant: Option<&'static str>,
    fields: Vec<(String, Node)>,
    key: Option<String>,
}

impl RecordBuilder {
    fn new(variant: Option<&'static str>, len: Option<usize>) -> Self {
        Self {
            variant,
            fields: Vec::with_capacity(len.unwrap_or(0).min(1024)),
            key: None,
        }
    }

    fn finish(self) -> Node {
        in_variant(self.variant, Node::Record(self.fields))
    }
}

impl ser::SerializeMap for RecordBuilder {
    type Ok = Node;
    type Error = TreeError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), TreeError> {
        self.key = Some(key.serialize(KeySerializer)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TreeError> {
        let key = self
            .key
            .take()
            .ok_or_else(|| TreeError("a map value without a key".into()))?;
        self.fields.push((key, Node::of(value)?));
        Ok(())
    }
    fn end(self) -> Result<Node, TreeError> {
        Ok(self.finish())
    }
}

impl ser::SerializeStruct for RecordBuilder {
    type Ok = Node;
    type Error = TreeError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), TreeError> {
        self.fields.push((key.to_string(), Node::of(value)?));
        Ok(())
    }
    fn end(self) -> Result<Node, TreeError> {
        Ok(self.finish())
    }
}

impl ser::SerializeStructVariant for RecordBuilder {
    type Ok = Node;
    type Error = TreeError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), TreeError> {
        ser::SerializeStruct::serialize_field(self, key, value)
    }
    fn end(self) -> Result<Node, TreeError> {
        Ok(self.finish())
    }
}

/// Serialises a map key: plain values only.
struct KeySerializer;

fn not_a_key() -> TreeError {
    TreeError("a map key that is not a plain value".into())
}

impl ser::Serializer for KeySerializer {
    type Ok = String;
    type Error = TreeError;
    type SerializeSeq = Impossible<String, TreeError>;
    type SerializeTuple = Impossible<String, TreeError>;
    type SerializeTupleStruct = Impossible<String, TreeError>;
    type SerializeTupleVariant = Impossible<String, TreeError>;
    type SerializeMap = Impossible<String, TreeError>;
    type SerializeStruct = Impossible<String, TreeError>;
    type SerializeStructVariant = Impossible<String, TreeError>;

    plain_values!(String, std::convert::identity);
    fn serialize_bytes(self, _v: &[u8]) -> Result<String, TreeError> {
        Err(not_a_key())
    }
    fn serialize_none(self) -> Result<String, TreeError> {
        Err(not_a_key())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<String, TreeError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<String, TreeError> {
        Err(not_a_key())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<String, TreeError> {
        Err(not_a_key())
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<String, TreeError> {
        Ok(variant.to_string())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<String, TreeError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<String, TreeError> {
        Err(not_a_key())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, TreeError> {
        Err(not_a_key())
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, TreeError> {
        Err(not_a_key())
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, TreeError> {
        Err(not_a_key())
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, TreeError> {
        Err(not_a_key())
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, TreeError> {
        Err(not_a_key())
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, TreeError> {
        Err(not_a_key())
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, TreeError> {
        Err(not_a_key())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use vd_core::{ByteSize, Facts, Offset};

    use super::*;

    #[derive(Serialize)]
    #[serde(rename_all = "snake_case")]
    enum Replay {
        InMemory,
    }

    #[derive(Serialize)]
    struct Region {
        guid: &'static str,
        offset: Offset,
        length: ByteSize,
        required: bool,
    }

    #[derive(Serialize)]
    struct Entry {
        sequence: u64,
        descriptors: Vec<u32>,
        note: Option<&'static str>,
    }

    #[derive(Serialize)]
    struct Sample {
        creator: &'static str,
        replay: Replay,
        absent: Option<u8>,
        empty: Vec<u8>,
        sizes: Vec<u32>,
        regions: Vec<Region>,
        locator: BTreeMap<&'static str, &'static str>,
        entries: Vec<Entry>,
    }

    fn text(value: &impl Serialize, indent: usize) -> String {
        let mut out = Vec::new();
        write_tree(&mut out, &Node::of(value).expect("tree"), indent).expect("write");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn typed_facts_render_as_an_indented_tree() {
        let sample = Sample {
            creator: "QEMU\u{1b}[31m",
            replay: Replay::InMemory,
            absent: None,
            empty: Vec::new(),
            sizes: vec![512, 4096],
            regions: vec![Region {
                guid: "2dc27766",
                offset: Offset(0x30_0000),
                length: ByteSize(1 << 20),
                required: true,
            }],
            locator: BTreeMap::from([("relative_path", r"..\base.vhdx")]),
            entries: vec![Entry {
                sequence: 7,
                descriptors: vec![1, 2],
                note: Some("x"),
            }],
        };
        assert_eq!(
            text(&Facts::new(sample), 2),
            "  creator: QEMU\\u{1b}[31m\n\
             \x20 replay:  in_memory\n\
             \x20 sizes:   512, 4096\n\
             \x20 regions:\n\
             \x20   - guid: 2dc27766, offset: 0x300000, length: 1 MiB (1048576 bytes), required: true\n\
             \x20 locator:\n\
             \x20   relative_path: ..\\base.vhdx\n\
             \x20 entries:\n\
             \x20   - sequence:    7\n\
             \x20     descriptors: 1, 2\n\
             \x20     note:        x\n"
        );
    }

    #[test]
    fn plain_values_and_lists_render_on_their_own() {
        assert_eq!(text(&5u32, 0), "5\n");
        assert_eq!(text(&vec!["a", "b"], 1), " - a\n - b\n");
        assert_eq!(text(&Option::<u8>::None, 0), "");
        assert_eq!(text(&Offset(16), 0), "0x10\n");
    }

    #[test]
    fn map_keys_must_be_plain_values() {
        let m = BTreeMap::from([(vec![1u8], 2u8)]);
        let e = Node::of(&m).expect_err("a list as a key");
        assert!(e.to_string().contains("map key"), "{e}");
    }
}
