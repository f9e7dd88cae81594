//! A chat request's body read in one pass with its messages borrowed: each message's string
//! fields (role, text, name) are slices of the body, not copies, and no map is built for the
//! body or its messages. Parsing every request into `serde_json::Value` — an
//! insertion-ordered, SipHash-indexed map per object and a copy of every string — was the
//! largest cost left in the gateway's own code on a request's path. Every other value
//! (`max_tokens`, `tools`, a message's content parts…) is read as the `Value` it would be in
//! a `Value` body. Counting and routing read either through [`ChatRequest`], so a body gets
//! the same count and the same route however it was read.
//!
//! The body is parsed by the same parser as a `Value` parse, every value in full, so it is
//! refused exactly where a `Value` parse refuses it, with the same error.

use std::borrow::Cow;
use std::fmt;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::json::{last_of_each, MemberName};

/// A chat request body's top-level members in order, a repeated name at each occurrence.
pub struct ChatBody<'a>(Vec<(Cow<'a, str>, Member<'a>)>);

enum Member<'a> {
    /// `messages`, when it is an array.
    Messages(Vec<MessageView<'a>>),
    Value(Value),
}

/// One element of `messages`.
enum MessageView<'a> {
    /// An object's fields in order, a repeated name at each occurrence.
    Fields(Vec<(Cow<'a, str>, Field<'a>)>),
    /// Anything else, read through.
    Other,
}

/// A message field's value.
enum Field<'a> {
    Text(Cow<'a, str>),
    Value(Value),
}

/// A message field as counting reads it, from a view or from a `Value`.
pub enum FieldRef<'v> {
    Text(&'v str),
    Tree(&'v Value),
}

/// A chat request body as counting and routing read it: a whole `Value`, or a [`ChatBody`].
pub trait ChatRequest {
    /// A top-level member's value (the last, if the name repeats); not `messages`.
    fn member(&self, name: &str) -> Option<&Value>;

    /// `messages` when it is an array: each element's fields as a `Value` object holds them
    /// (a repeated name once, with its last value), or `None` for an element that is not an
    /// object.
    #[allow(clippy::type_complexity)]
    fn messages(
        &self,
    ) -> Option<impl Iterator<Item = Option<impl Iterator<Item = (&str, FieldRef<'_>)>>>>;
}

impl ChatRequest for Value {
    fn member(&self, name: &str) -> Option<&Value> {
        self.get(name)
    }

    fn messages(
        &self,
    ) -> Option<impl Iterator<Item = Option<impl Iterator<Item = (&str, FieldRef<'_>)>>>> {
        Some(self["messages"].as_array()?.iter().map(|message| {
            Some(message.as_object()?.iter().map(|(name, value)| {
                let field = match value {
                    Value::String(text) => FieldRef::Text(text),
                    tree => FieldRef::Tree(tree),
                };
                (name.as_str(), field)
            }))
        }))
    }
}

impl ChatBody<'_> {
    /// Whether a top-level name appears more than once.
    pub fn repeats(&self) -> bool {
        last_of_each(&self.0).count() != self.0.len()
    }
}

impl ChatRequest for ChatBody<'_> {
    fn member(&self, name: &str) -> Option<&Value> {
        match &self.0.iter().rev().find(|(member, _)| member == name)?.1 {
            Member::Value(value) => Some(value),
            Member::Messages(_) => None,
        }
    }

    fn messages(
        &self,
    ) -> Option<impl Iterator<Item = Option<impl Iterator<Item = (&str, FieldRef<'_>)>>>> {
        let messages = match &self.0.iter().rev().find(|(name, _)| name == "messages")?.1 {
            Member::Messages(messages) => messages,
            Member::Value(_) => return None,
        };
        Some(messages.iter().map(|message| match message {
            MessageView::Fields(fields) => Some(last_of_each(fields).map(|(name, field)| {
                let field = match field {
                    Field::Text(text) => FieldRef::Text(text.as_ref()),
                    Field::Value(value) => FieldRef::Tree(value),
                };
                (name.as_ref(), field)
            })),
            MessageView::Other => None,
        }))
    }
}

impl<'v> FieldRef<'v> {
    /// The field as a `Value` reads: `None` for text.
    pub fn tree(&self) -> Option<&'v Value> {
        match self {
            FieldRef::Text(_) => None,
            FieldRef::Tree(tree) => Some(tree),
        }
    }
}

/// A visitor of any JSON value: the scalars as `Value` reads them, wrapped by `$wrap`.
macro_rules! scalars_as_values {
    ($wrap:expr) => {
        fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
            formatter.write_str("any JSON value")
        }
        fn visit_bool<E>(self, value: bool) -> Result<Self::Value, E> {
            Ok($wrap(Value::Bool(value)))
        }
        fn visit_i64<E>(self, value: i64) -> Result<Self::Value, E> {
            Ok($wrap(Value::from(value)))
        }
        fn visit_u64<E>(self, value: u64) -> Result<Self::Value, E> {
            Ok($wrap(Value::from(value)))
        }
        fn visit_f64<E>(self, value: f64) -> Result<Self::Value, E> {
            Ok($wrap(Value::from(value)))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($wrap(Value::Null))
        }
    };
}

impl<'de> Deserialize<'de> for ChatBody<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = ChatBody<'de>;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ChatBody<'de>, A::Error> {
                let mut members = Vec::with_capacity(8);
                while let Some(MemberName(name)) = map.next_key()? {
                    let member = if name == "messages" {
                        map.next_value()?
                    } else {
                        Member::Value(map.next_value()?)
                    };
                    members.push((name, member));
                }
                Ok(ChatBody(members))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

impl<'de> Deserialize<'de> for Member<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Member<'de>;
            scalars_as_values!(Member::Value);
            fn visit_str<E>(self, text: &str) -> Result<Member<'de>, E> {
                Ok(Member::Value(Value::String(text.to_owned())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Member<'de>, A::Error> {
                let mut messages = Vec::with_capacity(seq.size_hint().unwrap_or(4));
                while let Some(message) = seq.next_element()? {
                    messages.push(message);
                }
                Ok(Member::Messages(messages))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Member<'de>, A::Error> {
                Value::deserialize(MapAccessDeserializer::new(map)).map(Member::Value)
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

impl<'de> Deserialize<'de> for MessageView<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = MessageView<'de>;
            scalars_as_values!(|_| MessageView::Other);
            fn visit_str<E>(self, _: &str) -> Result<MessageView<'de>, E> {
                Ok(MessageView::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<MessageView<'de>, A::Error> {
                Value::deserialize(SeqAccessDeserializer::new(seq))?;
                Ok(MessageView::Other)
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<MessageView<'de>, A::Error> {
                let mut fields = Vec::with_capacity(4);
                while let Some((MemberName(name), field)) = map.next_entry()? {
                    fields.push((name, field));
                }
                Ok(MessageView::Fields(fields))
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

impl<'de> Deserialize<'de> for Field<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Field<'de>;
            scalars_as_values!(Field::Value);
            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Field<'de>, E> {
                Ok(Field::Text(Cow::Borrowed(text)))
            }
            fn visit_str<E>(self, text: &str) -> Result<Field<'de>, E> {
                Ok(Field::Text(Cow::Owned(text.to_owned())))
            }
            fn visit_string<E>(self, text: String) -> Result<Field<'de>, E> {
                Ok(Field::Text(Cow::Owned(text)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Field<'de>, A::Error> {
                Value::deserialize(SeqAccessDeserializer::new(seq)).map(Field::Value)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field<'de>, A::Error> {
                Value::deserialize(MapAccessDeserializer::new(map)).map(Field::Value)
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: &str) -> serde_json::Result<ChatBody<'_>> {
        serde_json::from_str(body)
    }

    fn fields(body: &impl ChatRequest) -> Option<Vec<Option<Vec<String>>>> {
        let messages = body.messages()?.map(|message| {
            message.map(|fields| {
                let mut fields: Vec<String> = fields
                    .map(|(name, field)| match field {
                        FieldRef::Text(text) => format!("{name}={text}"),
                        FieldRef::Tree(tree) => format!("{name}:{tree}"),
                    })
                    .collect();
                // A `Value` keeps a repeated name's first place, the view its last.
                fields.sort();
                fields
            })
        });
        Some(messages.collect())
    }

    #[test]
    fn message_texts_are_borrowed_from_the_body_unless_escaped() {
        let body = read(
            r#"{"model":"m","messages":[{"role":"user","content":"hi\nthere"},{"role":"system","content":"plain","n":2}]}"#,
        )
        .unwrap();
        let Member::Messages(messages) = &body.0[1].1 else {
            panic!("messages read as a view");
        };
        let borrowed: Vec<Vec<bool>> = messages
            .iter()
            .map(|message| match message {
                MessageView::Fields(fields) => fields
                    .iter()
                    .filter_map(|(_, field)| match field {
                        Field::Text(text) => Some(matches!(text, Cow::Borrowed(_))),
                        Field::Value(_) => None,
                    })
                    .collect(),
                MessageView::Other => panic!("an object"),
            })
            .collect();
        assert_eq!(borrowed, [vec![true, false], vec![true, true]]);
        assert_eq!(
            fields(&body).unwrap(),
            [
                Some(vec!["content=hi\nthere".to_owned(), "role=user".to_owned()]),
                Some(vec![
                    "content=plain".to_owned(),
                    "n:2".to_owned(),
                    "role=system".to_owned(),
                ]),
            ]
        );
        assert_eq!(body.member("model"), Some(&Value::from("m")));
        assert_eq!(body.member("messages"), None);
    }

    #[test]
    fn a_repeated_field_counts_once_with_its_last_value() {
        let body = read(r#"{"messages":[{"role":"user","content":"a","role":"x"}]}"#).unwrap();
        assert_eq!(
            fields(&body).unwrap(),
            [Some(vec!["content=a".to_owned(), "role=x".to_owned()])]
        );
        assert!(!body.repeats());
        assert!(read(r#"{"model":"a","stream":true,"model":"b"}"#)
            .unwrap()
            .repeats());
    }

    #[test]
    fn elements_that_are_not_objects_read_as_nothing() {
        let body = read(r#"{"messages":[1,"a",[{"x":1}],null,{}]}"#).unwrap();
        assert_eq!(
            fields(&body).unwrap(),
            [None, None, None, None, Some(vec![])]
        );
        for other in [
            r#"{"messages":"text"}"#,
            r#"{"messages":{"role":"user"}}"#,
            r#"{"messages":null}"#,
        ] {
            assert!(read(other).unwrap().messages().is_none(), "{other}");
        }
    }

    #[test]
    fn a_body_reads_as_its_value_reads() {
        for body in [
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a\u00e9"}],"name":"x","role":"y"},3,"s",[1,{"a":null}],null,{}],"stream":true,"max_tokens":1.5e3,"n":-2,"tools":[{"type":"function"}],"model":"n"}"#,
            r#"{"messages":{"a":[1,2]},"x":{"y":[true,false,null,"z"]}}"#,
            r#"{"messages":"text","messages":[{"content":"b"}]}"#,
            r#"{"messages":[{"content":"b"}],"messages":7}"#,
            r#"{}"#,
        ] {
            let value: Value = serde_json::from_str(body).unwrap();
            let view = read(body).unwrap();
            assert_eq!(fields(&view), fields(&value), "{body}");
            for name in ["model", "stream", "max_tokens", "n", "tools", "x", "absent"] {
                assert_eq!(view.member(name), value.member(name), "{body}: {name}");
            }
        }
    }

    #[test]
    fn a_body_is_refused_exactly_where_a_value_parse_refuses_it() {
        for body in [
            r#"{"messages":[{"content":"\ud800"}],"model":"m"}"#,
            r#"{"temperature":1e400,"model":"m"}"#,
            r#"{"messages":[{"content":[{"text":1e999}]}]}"#,
            r#"{"messages":[{"content":"a"},]}"#,
            r#"{"tools":[{"x":"\udc00"}]}"#,
            r#"{"metadata":{"a":[-1e400]}}"#,
            r#"{"model":"m"} x"#,
        ] {
            let theirs = serde_json::from_str::<Value>(body).unwrap_err().to_string();
            let ours = read(body).err().map(|error| error.to_string());
            assert_eq!(ours.as_deref(), Some(theirs.as_str()), "{body}");
        }
    }
}
