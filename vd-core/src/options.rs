//! Format options (`-o key=value`) as typed descriptions: each backend declares its table
//! ([`Backend::create_options`](crate::Backend::create_options)) and parses what it is given
//! through the same table ([`parse_create_options`]), so the options a help lists and those a
//! backend accepts cannot drift apart.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::numbers::parse_size;

/// The values a create option takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OptionKind {
    /// A size in bytes (qemu's syntax: `1M`, `0x100000`), from `min` to `max`, a multiple of
    /// `multiple_of`, and a power of two when `power_of_two`.
    Size {
        /// The smallest value.
        min: u64,
        /// The largest value.
        max: u64,
        /// Values are multiples of this (1: any).
        multiple_of: u64,
        /// Values are powers of two.
        power_of_two: bool,
    },
    /// One of these sizes in bytes.
    SizeOneOf {
        /// The sizes.
        sizes: &'static [u64],
    },
    /// One of these words.
    Choice {
        /// The words.
        choices: &'static [&'static str],
    },
}

/// One create option of a format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CreateOption {
    /// The key, as in `-o key=value`.
    pub name: &'static str,
    /// The values it takes.
    pub kind: OptionKind,
    /// What is used when the option is not given.
    pub default: &'static str,
    /// What it does, one line.
    pub help: &'static str,
}

/// A parsed option value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionValue {
    /// A size in bytes.
    Size(u64),
    /// One of the words of a [`OptionKind::Choice`].
    Choice(&'static str),
}

/// `n` bytes in the shortest exact form with a 1024-based suffix (`1M`, `1536K`, `512`).
fn short_size(n: u64) -> String {
    for (shift, suffix) in [
        (60, "E"),
        (50, "P"),
        (40, "T"),
        (30, "G"),
        (20, "M"),
        (10, "K"),
    ] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", n >> shift);
        }
    }
    n.to_string()
}

/// `items` joined as `a, b or c`.
fn either(items: &[String]) -> String {
    match items.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        Some((last, _)) => last.clone(),
        None => String::new(),
    }
}

impl OptionKind {
    /// The values it takes, in words: `a power of two from 1M to 256M`, `512 or 4096`,
    /// `dynamic or fixed`.
    pub fn describe(&self) -> String {
        match *self {
            Self::Size {
                min,
                max,
                multiple_of,
                power_of_two,
            } => {
                let what = if power_of_two {
                    "a power of two".to_string()
                } else if multiple_of > 1 {
                    format!("a multiple of {}", short_size(multiple_of))
                } else {
                    "a size".to_string()
                };
                format!("{what} from {} to {}", short_size(min), short_size(max))
            }
            Self::SizeOneOf { sizes } => {
                either(&sizes.iter().map(u64::to_string).collect::<Vec<_>>())
            }
            Self::Choice { choices } => {
                either(&choices.iter().map(|c| (*c).to_string()).collect::<Vec<_>>())
            }
        }
    }
}

impl CreateOption {
    /// Parses `value` for this option.
    ///
    /// # Errors
    /// `InvalidArgument` naming `key=value` and the values the option takes.
    pub fn parse(&self, value: &str) -> Result<OptionValue> {
        let refuse = |why: String| Error::invalid_argument(format!("{}={value}: {why}", self.name));
        match self.kind {
            OptionKind::Choice { choices } => choices
                .iter()
                .find(|c| **c == value)
                .map(|c| OptionValue::Choice(c))
                .ok_or_else(|| refuse(format!("use {}", self.kind.describe()))),
            OptionKind::Size {
                min,
                max,
                multiple_of,
                power_of_two,
            } => {
                let n = parse_size(value).map_err(|e| refuse(e.to_string()))?;
                let fits = (min..=max).contains(&n)
                    && n.is_multiple_of(multiple_of.max(1))
                    && (!power_of_two || n.is_power_of_two());
                if fits {
                    Ok(OptionValue::Size(n))
                } else {
                    Err(refuse(format!("use {}", self.kind.describe())))
                }
            }
            OptionKind::SizeOneOf { sizes } => {
                let n = parse_size(value).map_err(|e| refuse(e.to_string()))?;
                if sizes.contains(&n) {
                    Ok(OptionValue::Size(n))
                } else {
                    Err(refuse(format!("use {}", self.kind.describe())))
                }
            }
        }
    }
}

/// Options parsed against a table by [`parse_create_options`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOptionValues {
    values: BTreeMap<&'static str, OptionValue>,
}

impl CreateOptionValues {
    /// Whether the option was given.
    pub fn contains(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    /// The size given for `name`, if any.
    pub fn size(&self, name: &str) -> Option<u64> {
        match self.values.get(name) {
            Some(OptionValue::Size(n)) => Some(*n),
            _ => None,
        }
    }

    /// The word given for `name`, if any.
    pub fn choice(&self, name: &str) -> Option<&'static str> {
        match self.values.get(name) {
            Some(OptionValue::Choice(c)) => Some(c),
            _ => None,
        }
    }
}

/// Parses the `given` options of format `format` against its `table`.
///
/// # Errors
/// `InvalidArgument` for an option the table does not have (listing those it has) or a value
/// the option does not take.
pub fn parse_create_options(
    format: &str,
    table: &'static [CreateOption],
    given: &BTreeMap<String, String>,
) -> Result<CreateOptionValues> {
    let mut values = BTreeMap::new();
    for (k, v) in given {
        let Some(option) = table.iter().find(|o| o.name == k) else {
            let names: Vec<&str> = table.iter().map(|o| o.name).collect();
            let supported = if names.is_empty() {
                "it takes none".to_string()
            } else {
                format!("supported: {}", names.join(", "))
            };
            return Err(Error::invalid_argument(format!(
                "{format} does not support the option {k}={v} ({supported}; -o help lists them)"
            )));
        };
        values.insert(option.name, option.parse(v)?);
    }
    Ok(CreateOptionValues { values })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    static TABLE: &[CreateOption] = &[
        CreateOption {
            name: "block",
            kind: OptionKind::Size {
                min: 1 << 20,
                max: 256 << 20,
                multiple_of: 1,
                power_of_two: true,
            },
            default: "32M",
            help: "block size",
        },
        CreateOption {
            name: "log",
            kind: OptionKind::Size {
                min: 1 << 20,
                max: 1 << 30,
                multiple_of: 1 << 20,
                power_of_two: false,
            },
            default: "1M",
            help: "log size",
        },
        CreateOption {
            name: "sector",
            kind: OptionKind::SizeOneOf {
                sizes: &[512, 4096],
            },
            default: "512",
            help: "sector size",
        },
        CreateOption {
            name: "mode",
            kind: OptionKind::Choice {
                choices: &["dynamic", "fixed"],
            },
            default: "dynamic",
            help: "preallocation",
        },
    ];

    fn given(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn values_are_parsed_and_typed_by_the_table() {
        let v = parse_create_options(
            "t",
            TABLE,
            &given(&[
                ("block", "0x100000"),
                ("log", "3M"),
                ("sector", "4K"),
                ("mode", "fixed"),
            ]),
        )
        .expect("valid");
        assert_eq!(v.size("block"), Some(1 << 20));
        assert_eq!(v.size("log"), Some(3 << 20));
        assert_eq!(v.size("sector"), Some(4096));
        assert_eq!(v.choice("mode"), Some("fixed"));
        assert_eq!(v.size("mode"), None);
        assert!(
            v.contains("log")
                && !parse_create_options("t", TABLE, &given(&[]))
                    .expect("none")
                    .contains("log")
        );
    }

    #[test]
    fn values_out_of_range_and_unknown_options_are_refused_with_what_is_taken() {
        for (k, v, says) in [
            (
                "block",
                "3M",
                "block=3M: use a power of two from 1M to 256M",
            ),
            ("block", "512M", "a power of two from 1M to 256M"),
            ("block", "1.5Q", "is not a size: use a number of bytes"),
            (
                "log",
                "1536K",
                "log=1536K: use a multiple of 1M from 1M to 1G",
            ),
            ("log", "2G", "a multiple of 1M from 1M to 1G"),
            ("sector", "1024", "sector=1024: use 512 or 4096"),
            ("mode", "sparse", "mode=sparse: use dynamic or fixed"),
            (
                "colour",
                "red",
                "t does not support the option colour=red (supported: block, log, sector, mode",
            ),
        ] {
            let e = parse_create_options("t", TABLE, &given(&[(k, v)])).expect_err(v);
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(e.to_string().contains(says), "{e}");
        }
        let e = parse_create_options("none", &[], &given(&[("a", "1")])).expect_err("none");
        assert!(e.to_string().contains("it takes none"), "{e}");
    }

    #[test]
    fn kinds_describe_themselves() {
        let d: Vec<String> = TABLE.iter().map(|o| o.kind.describe()).collect();
        assert_eq!(
            d,
            [
                "a power of two from 1M to 256M",
                "a multiple of 1M from 1M to 1G",
                "512 or 4096",
                "dynamic or fixed"
            ]
        );
        assert_eq!(short_size(1536 << 10), "1536K");
        assert_eq!(short_size(0), "0");
        assert_eq!(either(&["a".into(), "b".into(), "c".into()]), "a, b or c");
    }
}
