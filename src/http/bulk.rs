//! Bulk bodies parsed with their item cap: a list is read item by item and
//! the parse stops at the first item over the cap, so memory is bounded by
//! the cap, not by the body (which `max_bulk_body_bytes` bounds).

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use hyper::StatusCode;
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};

use crate::error::ApiError;

/// 413 for a list over its cap.
pub fn too_many(what: &str, max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_items",
        format!("more than {max} {what} in one request; at most {max} are accepted"),
    )
}

/// Parses `text` as a JSON object with exactly one field, `field`, whose
/// value is a list of at most `max` items. Other fields, a missing field or
/// anything but an object are 400 as serde_json reports them; the item after
/// the cap ends the parse with 413 `too_many_items` naming `what`.
pub fn parse_list<'de, T: Deserialize<'de>>(
    text: &'de str,
    field: &'static str,
    max: usize,
    what: &str,
) -> Result<Vec<T>, ApiError> {
    let over = Cell::new(false);
    let seed = OneList { field, max, over: &over, item: PhantomData };
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = seed.deserialize(&mut de).and_then(|list| de.end().map(|()| list));
    match parsed {
        Ok(list) => Ok(list),
        Err(_) if over.get() => Err(too_many(what, max)),
        Err(e) => Err(e.into()),
    }
}

/// The body object: one known field holding the capped list.
struct OneList<'a, T> {
    field: &'static str,
    max: usize,
    over: &'a Cell<bool>,
    item: PhantomData<fn() -> T>,
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for OneList<'_, T> {
    type Value = Vec<T>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for OneList<'_, T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a JSON object with a {:?} list", self.field)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<T>, A::Error> {
        let mut list = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key != self.field {
                // Worded as `deny_unknown_fields` words it.
                return Err(A::Error::custom(format_args!(
                    "unknown field `{key}`, expected `{}`",
                    self.field
                )));
            }
            if list.is_some() {
                return Err(A::Error::duplicate_field(self.field));
            }
            list = Some(map.next_value_seed(Capped { max: self.max, over: self.over, item: PhantomData })?);
        }
        list.ok_or_else(|| A::Error::missing_field(self.field))
    }
}

/// A JSON array of at most `max` items.
struct Capped<'a, T> {
    max: usize,
    over: &'a Cell<bool>,
    item: PhantomData<fn() -> T>,
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for Capped<'_, T> {
    type Value = Vec<T>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Capped<'_, T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of at most {} items", self.max)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        // serde_json gives no length: grow as items come, never past the cap.
        let mut out = Vec::new();
        while let Some(item) = seq.next_element()? {
            if out.len() == self.max {
                self.over.set(true);
                return Err(A::Error::custom(format_args!("more than {} items", self.max)));
            }
            out.push(item);
        }
        Ok(out)
    }
}

/// The number of ids a portable-format roaring bitmap says it holds, read
/// from its header without building it (`None` if the header is not one).
/// Each container's cardinality is in the descriptive header, run
/// containers included, so a small body of long runs is counted as the
/// many ids it stands for.
pub fn roaring_cardinality(bytes: &[u8]) -> Option<u64> {
    const NO_RUNS: u32 = 12346;
    const WITH_RUNS: u16 = 12347;
    let u16_at = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let cookie = u32_at(0)?;
    let (containers, header) = if cookie == NO_RUNS {
        (u32_at(4)? as usize, 8)
    } else if cookie as u16 == WITH_RUNS {
        let n = (cookie >> 16) as usize + 1;
        (n, 4 + n.div_ceil(8))
    } else {
        return None;
    };
    if containers > 65_536 {
        return None;
    }
    let mut total = 0u64;
    for i in 0..containers {
        total += u64::from(u16_at(header + 4 * i + 2)?) + 1;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use roaring::RoaringBitmap;

    #[test]
    fn a_list_parses_up_to_its_cap_and_stops_after_it() {
        let ok: Vec<u64> = parse_list(r#"{"ids": [1, 2, 3]}"#, "ids", 3, "ids").unwrap();
        assert_eq!(ok, [1, 2, 3]);
        let e = parse_list::<u64>(r#"{"ids": [1, 2, 3, 4, "not even read"]}"#, "ids", 3, "ids").unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (413, "too_many_items"));
        // Everything else is the usual 400.
        for bad in [r#"{"ids": [1], "x": 1}"#, r#"{}"#, r#"[[1]]"#, r#"{"ids": [1]} 7"#, r#"{"ids": ["a"]}"#]
        {
            let e = parse_list::<u64>(bad, "ids", 3, "ids").unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{bad}: {e}");
        }
    }

    #[test]
    fn roaring_cardinality_reads_the_header_of_both_formats() {
        let mut sparse = RoaringBitmap::new();
        sparse.extend([1u32, 70_000, 5_000_000]);
        let mut runs: RoaringBitmap = (0..300_000u32).collect();
        runs.optimize();
        for b in [sparse, runs, RoaringBitmap::new()] {
            let mut bytes = Vec::new();
            b.serialize_into(&mut bytes).unwrap();
            assert_eq!(roaring_cardinality(&bytes), Some(b.len()));
        }
        assert_eq!(roaring_cardinality(b"nope"), None);
    }
}
