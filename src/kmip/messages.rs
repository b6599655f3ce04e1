//! The KMIP 1.4 messages kmsfs sends and the answers it reads, as TTLV items: request
//! payloads for Create, Activate, Locate, Get Attributes, Encrypt, Decrypt, Revoke and
//! Destroy, a request message of several batch items, and a response message split into
//! one result per batch item. Pure, like [`super::ttlv`]: no I/O, every field the answer
//! must have is checked, and nothing here panics on what a server sends.

use super::ttlv::{Item, Tag, Value};
use zeroize::Zeroizing;

/// The tags used here (KMIP 1.4, section 9.1.3.1).
pub mod tag {
    use super::Tag;
    pub const ATTRIBUTE: Tag = Tag(0x420008);
    pub const ATTRIBUTE_NAME: Tag = Tag(0x42000A);
    pub const ATTRIBUTE_VALUE: Tag = Tag(0x42000B);
    pub const BATCH_COUNT: Tag = Tag(0x42000D);
    pub const BATCH_ERROR_CONTINUATION_OPTION: Tag = Tag(0x42000E);
    pub const BATCH_ITEM: Tag = Tag(0x42000F);
    pub const BLOCK_CIPHER_MODE: Tag = Tag(0x420011);
    pub const COMPROMISE_OCCURRENCE_DATE: Tag = Tag(0x420021);
    pub const CRYPTOGRAPHIC_ALGORITHM: Tag = Tag(0x420028);
    pub const CRYPTOGRAPHIC_PARAMETERS: Tag = Tag(0x42002B);
    pub const IV_COUNTER_NONCE: Tag = Tag(0x42003D);
    pub const NAME: Tag = Tag(0x420053);
    pub const NAME_TYPE: Tag = Tag(0x420054);
    pub const NAME_VALUE: Tag = Tag(0x420055);
    pub const OBJECT_TYPE: Tag = Tag(0x420057);
    pub const OPERATION: Tag = Tag(0x42005C);
    pub const PROTOCOL_VERSION: Tag = Tag(0x420069);
    pub const PROTOCOL_VERSION_MAJOR: Tag = Tag(0x42006A);
    pub const PROTOCOL_VERSION_MINOR: Tag = Tag(0x42006B);
    pub const REQUEST_HEADER: Tag = Tag(0x420077);
    pub const REQUEST_MESSAGE: Tag = Tag(0x420078);
    pub const REQUEST_PAYLOAD: Tag = Tag(0x420079);
    pub const RESPONSE_HEADER: Tag = Tag(0x42007A);
    pub const RESPONSE_MESSAGE: Tag = Tag(0x42007B);
    pub const RESPONSE_PAYLOAD: Tag = Tag(0x42007C);
    pub const RESULT_MESSAGE: Tag = Tag(0x42007D);
    pub const RESULT_REASON: Tag = Tag(0x42007E);
    pub const RESULT_STATUS: Tag = Tag(0x42007F);
    pub const REVOCATION_REASON: Tag = Tag(0x420081);
    pub const REVOCATION_REASON_CODE: Tag = Tag(0x420082);
    pub const TAG_LENGTH: Tag = Tag(0x4200CE);
    pub const TEMPLATE_ATTRIBUTE: Tag = Tag(0x420091);
    pub const UNIQUE_BATCH_ITEM_ID: Tag = Tag(0x420093);
    pub const UNIQUE_IDENTIFIER: Tag = Tag(0x420094);
    pub const DATA: Tag = Tag(0x4200C2);
    pub const AEAD_ADDITIONAL_DATA: Tag = Tag(0x4200FE);
    pub const AEAD_TAG: Tag = Tag(0x4200FF);
}

/// Operation numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Operation {
    Create = 0x01,
    Locate = 0x08,
    GetAttributes = 0x0B,
    Activate = 0x12,
    Revoke = 0x13,
    Destroy = 0x14,
    Encrypt = 0x1F,
    Decrypt = 0x20,
}

/// Object states (the `State` attribute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    PreActive,
    Active,
    Deactivated,
    Compromised,
    Destroyed,
    DestroyedCompromised,
    Other(u32),
}

impl State {
    pub fn from_code(c: u32) -> State {
        match c {
            1 => State::PreActive,
            2 => State::Active,
            3 => State::Deactivated,
            4 => State::Compromised,
            5 => State::Destroyed,
            6 => State::DestroyedCompromised,
            c => State::Other(c),
        }
    }
}

/// Result reasons the client tells apart (KMIP 1.4, 9.1.3.2.29).
pub mod reason {
    pub const ITEM_NOT_FOUND: u32 = 0x01;
    pub const AUTHENTICATION_NOT_SUCCESSFUL: u32 = 0x03;
    pub const CRYPTOGRAPHIC_FAILURE: u32 = 0x0A;
    pub const PERMISSION_DENIED: u32 = 0x0C;
    pub const GENERAL_FAILURE: u32 = 0x100;
}

/// Revocation reason codes.
pub mod revocation {
    pub const KEY_COMPROMISE: u32 = 0x02;
    pub const CESSATION_OF_OPERATION: u32 = 0x06;
}

/// The protocol version of our requests: 1.4, the first with AEAD fields in Encrypt/Decrypt.
pub const PROTOCOL_VERSION: (i32, i32) = (1, 4);
/// The tag length we ask for in AES-GCM, in bytes.
pub const GCM_TAG_LEN: usize = 16;
/// At most this many batch items per message.
pub const MAX_BATCH: usize = 64;

const AES: u32 = 0x03;
const GCM: u32 = 0x09;
const SYMMETRIC_KEY: u32 = 0x02;
const CONTINUE_ON_ERROR: u32 = 0x01;
const UNINTERPRETED_TEXT_STRING: u32 = 0x01;
/// Encrypt | Decrypt.
const USAGE_ENCRYPT_DECRYPT: i32 = 0x04 | 0x08;

fn text(t: Tag, s: &str) -> Item {
    Item::new(t, Value::TextString(s.to_owned()))
}
fn bytes(t: Tag, b: &[u8]) -> Item {
    Item::new(t, Value::ByteString(Zeroizing::new(b.to_vec())))
}
fn enumeration(t: Tag, v: u32) -> Item {
    Item::new(t, Value::Enumeration(v))
}
fn integer(t: Tag, v: i32) -> Item {
    Item::new(t, Value::Integer(v))
}
fn uid(u: &str) -> Item {
    text(tag::UNIQUE_IDENTIFIER, u)
}

fn attribute(name: &str, value: Value) -> Item {
    Item::structure(
        tag::ATTRIBUTE,
        vec![
            text(tag::ATTRIBUTE_NAME, name),
            Item::new(tag::ATTRIBUTE_VALUE, value),
        ],
    )
}

fn name_attribute(name: &str) -> Item {
    attribute(
        "Name",
        Value::Structure(vec![
            text(tag::NAME_VALUE, name),
            enumeration(tag::NAME_TYPE, UNINTERPRETED_TEXT_STRING),
        ]),
    )
}

/// One batch item of a request: an operation and its payload's items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub operation: Operation,
    pub payload: Vec<Item>,
}

/// Create an AES-256 key usable for Encrypt and Decrypt, named `name`.
pub fn create_aes_key(name: &str) -> Request {
    let attrs = vec![
        attribute("Cryptographic Algorithm", Value::Enumeration(AES)),
        attribute("Cryptographic Length", Value::Integer(256)),
        attribute("Cryptographic Usage Mask", Value::Integer(USAGE_ENCRYPT_DECRYPT)),
        name_attribute(name),
    ];
    Request {
        operation: Operation::Create,
        payload: vec![
            enumeration(tag::OBJECT_TYPE, SYMMETRIC_KEY),
            Item::structure(tag::TEMPLATE_ATTRIBUTE, attrs),
        ],
    }
}

/// The objects named `name` (that the caller may see).
pub fn locate_by_name(name: &str) -> Request {
    Request {
        operation: Operation::Locate,
        payload: vec![name_attribute(name)],
    }
}

/// The `State` and `Initial Date` of object `id`.
pub fn get_state(id: &str) -> Request {
    Request {
        operation: Operation::GetAttributes,
        payload: vec![
            uid(id),
            text(tag::ATTRIBUTE_NAME, "State"),
            text(tag::ATTRIBUTE_NAME, "Initial Date"),
        ],
    }
}

pub fn activate(id: &str) -> Request {
    Request {
        operation: Operation::Activate,
        payload: vec![uid(id)],
    }
}

/// Revoke `id` with reason `code` (see [`revocation`]).
pub fn revoke(id: &str, code: u32) -> Request {
    let mut payload = vec![
        uid(id),
        Item::structure(
            tag::REVOCATION_REASON,
            vec![enumeration(tag::REVOCATION_REASON_CODE, code)],
        ),
    ];
    if code == revocation::KEY_COMPROMISE {
        payload.push(Item::new(tag::COMPROMISE_OCCURRENCE_DATE, Value::DateTime(0)));
    }
    Request {
        operation: Operation::Revoke,
        payload,
    }
}

pub fn destroy(id: &str) -> Request {
    Request {
        operation: Operation::Destroy,
        payload: vec![uid(id)],
    }
}

fn gcm_parameters() -> Item {
    Item::structure(
        tag::CRYPTOGRAPHIC_PARAMETERS,
        vec![
            enumeration(tag::BLOCK_CIPHER_MODE, GCM),
            enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, AES),
            integer(tag::TAG_LENGTH, GCM_TAG_LEN as i32),
        ],
    )
}

/// AES-GCM encryption of `plaintext` under key `id` with our `iv` and associated data `aad`.
pub fn encrypt(id: &str, plaintext: &[u8], iv: &[u8], aad: &[u8]) -> Request {
    Request {
        operation: Operation::Encrypt,
        payload: vec![
            uid(id),
            gcm_parameters(),
            bytes(tag::DATA, plaintext),
            bytes(tag::IV_COUNTER_NONCE, iv),
            bytes(tag::AEAD_ADDITIONAL_DATA, aad),
        ],
    }
}

/// AES-GCM decryption of `ciphertext` with its `iv`, `aad` and `gcm_tag` under key `id`.
pub fn decrypt(id: &str, ciphertext: &[u8], iv: &[u8], aad: &[u8], gcm_tag: &[u8]) -> Request {
    Request {
        operation: Operation::Decrypt,
        payload: vec![
            uid(id),
            gcm_parameters(),
            bytes(tag::DATA, ciphertext),
            bytes(tag::IV_COUNTER_NONCE, iv),
            bytes(tag::AEAD_ADDITIONAL_DATA, aad),
            bytes(tag::AEAD_TAG, gcm_tag),
        ],
    }
}

/// A request message of `batch` (1 to [`MAX_BATCH`] items), numbered 0, 1, … by their batch
/// item ids; a failed item does not stop the others.
pub fn request_message(batch: Vec<Request>) -> Item {
    let (major, minor) = PROTOCOL_VERSION;
    // The fields in the order of the specification (KMIP 1.4, 7.2): servers parse them so.
    let mut header = vec![Item::structure(
        tag::PROTOCOL_VERSION,
        vec![
            integer(tag::PROTOCOL_VERSION_MAJOR, major),
            integer(tag::PROTOCOL_VERSION_MINOR, minor),
        ],
    )];
    if batch.len() > 1 {
        header.push(enumeration(
            tag::BATCH_ERROR_CONTINUATION_OPTION,
            CONTINUE_ON_ERROR,
        ));
    }
    header.push(integer(tag::BATCH_COUNT, batch.len() as i32));
    let mut items = vec![Item::structure(tag::REQUEST_HEADER, header)];
    for (i, r) in batch.into_iter().enumerate() {
        let mut fields = vec![enumeration(tag::OPERATION, r.operation as u32)];
        fields.push(bytes(tag::UNIQUE_BATCH_ITEM_ID, &(i as u32).to_be_bytes()));
        fields.push(Item::structure(tag::REQUEST_PAYLOAD, r.payload));
        items.push(Item::structure(tag::BATCH_ITEM, fields));
    }
    Item::structure(tag::REQUEST_MESSAGE, items)
}

/// A batch item that failed: the server's reason code (see [`reason`]) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: Option<u32>,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.reason {
            Some(reason::ITEM_NOT_FOUND) => "Item Not Found",
            Some(reason::AUTHENTICATION_NOT_SUCCESSFUL) => "Authentication Not Successful",
            Some(reason::CRYPTOGRAPHIC_FAILURE) => "Cryptographic Failure",
            Some(reason::PERMISSION_DENIED) => "Permission Denied",
            Some(reason::GENERAL_FAILURE) => "General Failure",
            Some(0x04) => "Invalid Message",
            Some(0x05) => "Operation Not Supported",
            Some(0x07) => "Invalid Field",
            Some(0x08) => "Feature Not Supported",
            Some(0x0B) => "Illegal Operation",
            Some(_) | None => "failed",
        };
        // The server's text goes into logs and messages: one line, no control characters.
        let msg: String = self
            .message
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        match self.reason {
            Some(r) => write!(f, "{name} ({r:#x}): {msg}"),
            None => write!(f, "{name}: {msg}"),
        }
    }
}

/// A response that is not a KMIP response message we can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedResponse(pub &'static str);

impl std::fmt::Display for MalformedResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed KMIP response: {}", self.0)
    }
}

/// One result per batch item of `response`, in the order of the request's `count` items:
/// the payload's items on success. A server may answer a message it refuses as a whole with
/// one failed item (no batch item id): that failure is then every item's.
pub fn parse_response(
    response: &Item,
    count: usize,
) -> Result<Vec<Result<Vec<Item>, Failure>>, MalformedResponse> {
    if response.tag != tag::RESPONSE_MESSAGE || !matches!(response.value, Value::Structure(_)) {
        return Err(MalformedResponse("not a response message"));
    }
    response
        .child(tag::RESPONSE_HEADER)
        .ok_or(MalformedResponse("no response header"))?;
    let items: Vec<&Item> = response.children(tag::BATCH_ITEM).collect();
    let mut out: Vec<Option<Result<Vec<Item>, Failure>>> = vec![None; count];
    for item in &items {
        let status = match item.child(tag::RESULT_STATUS).map(|s| &s.value) {
            Some(Value::Enumeration(s)) => *s,
            _ => return Err(MalformedResponse("a batch item without a result status")),
        };
        let result = if status == 0 {
            match item.child(tag::RESPONSE_PAYLOAD).map(|p| &p.value) {
                Some(Value::Structure(fields)) => Ok(fields.clone()),
                Some(_) => return Err(MalformedResponse("a payload that is not a structure")),
                None => Ok(Vec::new()),
            }
        } else {
            Err(Failure {
                reason: match item.child(tag::RESULT_REASON).map(|r| &r.value) {
                    Some(Value::Enumeration(r)) => Some(*r),
                    _ => None,
                },
                message: match item.child(tag::RESULT_MESSAGE).map(|m| &m.value) {
                    Some(Value::TextString(m)) => m.chars().take(500).collect(),
                    _ => String::new(),
                },
            })
        };
        let id = match item.child(tag::UNIQUE_BATCH_ITEM_ID).map(|i| &i.value) {
            Some(Value::ByteString(b)) => match <[u8; 4]>::try_from(&b[..]) {
                Ok(b) => Some(u32::from_be_bytes(b) as usize),
                Err(_) => return Err(MalformedResponse("a batch item id we did not send")),
            },
            Some(_) => return Err(MalformedResponse("a batch item id that is not bytes")),
            None => None,
        };
        match id {
            Some(i) if i < count && out[i].is_none() => out[i] = Some(result),
            Some(_) => return Err(MalformedResponse("a batch item id we did not send, or twice")),
            // Without an id: the only item of a one-item batch, or a refusal of the message.
            None if items.len() == 1 && (count == 1 || result.is_err()) => {
                return Ok(vec![result; count]);
            }
            None => return Err(MalformedResponse("a batch item without its id")),
        }
    }
    // Items the server did not get to (it stopped at an error) fail with that reason.
    let missing = Failure {
        reason: None,
        message: "the server did not answer this batch item".into(),
    };
    Ok(out
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(missing.clone())))
        .collect())
}

fn field(payload: &[Item], t: Tag) -> Option<&Value> {
    payload.iter().find(|i| i.tag == t).map(|i| &i.value)
}

fn text_field(payload: &[Item], t: Tag, what: &'static str) -> Result<String, MalformedResponse> {
    match field(payload, t) {
        Some(Value::TextString(s)) => Ok(s.clone()),
        _ => Err(MalformedResponse(what)),
    }
}

fn bytes_field<'a>(payload: &'a [Item], t: Tag, what: &'static str) -> Result<&'a [u8], MalformedResponse> {
    match field(payload, t) {
        Some(Value::ByteString(b)) => Ok(b),
        _ => Err(MalformedResponse(what)),
    }
}

/// The new object's unique identifier (Create).
pub fn created_id(payload: &[Item]) -> Result<String, MalformedResponse> {
    text_field(
        payload,
        tag::UNIQUE_IDENTIFIER,
        "Create answer without an identifier",
    )
}

/// The identifiers a Locate found.
pub fn located_ids(payload: &[Item]) -> Result<Vec<String>, MalformedResponse> {
    payload
        .iter()
        .filter(|i| i.tag == tag::UNIQUE_IDENTIFIER)
        .map(|i| match &i.value {
            Value::TextString(s) => Ok(s.clone()),
            _ => Err(MalformedResponse(
                "Locate answer with an identifier that is not text",
            )),
        })
        .collect()
}

/// An object's state and initial date, from a Get Attributes answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyState {
    pub state: State,
    /// Seconds since the epoch; 0 if the server did not say.
    pub initial_date: i64,
}

pub fn key_state(payload: &[Item]) -> Result<KeyState, MalformedResponse> {
    let mut state = None;
    let mut initial_date = 0;
    for a in payload.iter().filter(|i| i.tag == tag::ATTRIBUTE) {
        let name = match a.child(tag::ATTRIBUTE_NAME).map(|n| &n.value) {
            Some(Value::TextString(n)) => n.as_str(),
            _ => continue,
        };
        match (name, a.child(tag::ATTRIBUTE_VALUE).map(|v| &v.value)) {
            ("State", Some(Value::Enumeration(s))) => state = Some(State::from_code(*s)),
            ("Initial Date", Some(Value::DateTime(d))) => initial_date = *d,
            _ => {}
        }
    }
    Ok(KeyState {
        state: state.ok_or(MalformedResponse("Get Attributes answer without the State"))?,
        initial_date,
    })
}

/// What an Encrypt answered: the ciphertext and the GCM tag.
pub struct Encrypted {
    pub ciphertext: Vec<u8>,
    pub tag: Vec<u8>,
}

pub fn encrypted(payload: &[Item]) -> Result<Encrypted, MalformedResponse> {
    Ok(Encrypted {
        ciphertext: bytes_field(payload, tag::DATA, "Encrypt answer without data")?.to_vec(),
        tag: bytes_field(payload, tag::AEAD_TAG, "Encrypt answer without a GCM tag")?.to_vec(),
    })
}

/// The plaintext a Decrypt answered, in a buffer wiped on drop.
pub fn decrypted(payload: &[Item]) -> Result<Zeroizing<Vec<u8>>, MalformedResponse> {
    Ok(Zeroizing::new(
        bytes_field(payload, tag::DATA, "Decrypt answer without data")?.to_vec(),
    ))
}

#[cfg(test)]
mod tests {
    use super::super::ttlv::{decode, encode};
    use super::*;
    use proptest::prelude::*;

    fn response(items: Vec<Item>) -> Item {
        let mut all = vec![Item::structure(
            tag::RESPONSE_HEADER,
            vec![integer(tag::BATCH_COUNT, items.len() as i32)],
        )];
        all.extend(items);
        Item::structure(tag::RESPONSE_MESSAGE, all)
    }

    fn ok_item(id: Option<u32>, payload: Vec<Item>) -> Item {
        let mut f = vec![enumeration(tag::RESULT_STATUS, 0)];
        if let Some(i) = id {
            f.push(bytes(tag::UNIQUE_BATCH_ITEM_ID, &i.to_be_bytes()));
        }
        f.push(Item::structure(tag::RESPONSE_PAYLOAD, payload));
        Item::structure(tag::BATCH_ITEM, f)
    }

    fn failed_item(id: Option<u32>, reason: u32, msg: &str) -> Item {
        let mut f = vec![enumeration(tag::RESULT_STATUS, 1)];
        if let Some(i) = id {
            f.push(bytes(tag::UNIQUE_BATCH_ITEM_ID, &i.to_be_bytes()));
        }
        f.push(enumeration(tag::RESULT_REASON, reason));
        f.push(text(tag::RESULT_MESSAGE, msg));
        Item::structure(tag::BATCH_ITEM, f)
    }

    #[test]
    fn a_batch_of_decrypts_encodes_with_ids_and_continue_on_error() {
        let m = request_message(vec![
            decrypt("1", &[1; 32], &[2; 12], b"ctx", &[3; 16]),
            decrypt("2", &[1; 32], &[2; 12], b"ctx", &[3; 16]),
        ]);
        let back = decode(&encode(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        let header = m.child(tag::REQUEST_HEADER).unwrap();
        assert_eq!(
            header.child(tag::BATCH_COUNT).map(|c| &c.value),
            Some(&Value::Integer(2))
        );
        assert!(header.child(tag::BATCH_ERROR_CONTINUATION_OPTION).is_some());
        // Batch Count comes last in the header: PyKMIP refuses the message otherwise.
        let Value::Structure(fields) = &header.value else {
            panic!()
        };
        assert_eq!(fields.last().unwrap().tag, tag::BATCH_COUNT);
        let ids: Vec<_> = m
            .children(tag::BATCH_ITEM)
            .map(|b| b.child(tag::UNIQUE_BATCH_ITEM_ID).unwrap().value.clone())
            .collect();
        assert_eq!(
            ids,
            [
                Value::ByteString(Zeroizing::new(vec![0, 0, 0, 0])),
                Value::ByteString(Zeroizing::new(vec![0, 0, 0, 1]))
            ]
        );
    }

    #[test]
    fn results_are_matched_by_id_whatever_their_order() {
        let r = response(vec![
            failed_item(Some(1), reason::GENERAL_FAILURE, "bad tag\n"),
            ok_item(Some(0), vec![bytes(tag::DATA, &[9; 32])]),
        ]);
        let out = parse_response(&r, 3).unwrap();
        assert_eq!(decrypted(out[0].as_ref().unwrap()).unwrap().as_slice(), &[9; 32]);
        let f = out[1].as_ref().unwrap_err();
        assert_eq!(f.reason, Some(reason::GENERAL_FAILURE));
        assert_eq!(f.to_string(), "General Failure (0x100): bad tag ");
        assert_eq!(out[2].as_ref().unwrap_err().reason, None, "not answered");
    }

    #[test]
    fn a_refused_message_fails_every_item() {
        let r = response(vec![failed_item(None, reason::PERMISSION_DENIED, "no")]);
        let out = parse_response(&r, 2).unwrap();
        assert!(
            out.iter()
                .all(|r| r.as_ref().unwrap_err().reason == Some(reason::PERMISSION_DENIED))
        );
        // One item, no id, success: fine for a batch of one only.
        let one = response(vec![ok_item(None, vec![uid("7")])]);
        assert_eq!(
            created_id(parse_response(&one, 1).unwrap()[0].as_ref().unwrap()).unwrap(),
            "7"
        );
        assert!(parse_response(&one, 2).is_err());
    }

    #[test]
    fn malformed_responses_are_errors() {
        let dup = response(vec![ok_item(Some(0), vec![]), ok_item(Some(0), vec![])]);
        assert!(parse_response(&dup, 2).is_err());
        let far = response(vec![ok_item(Some(5), vec![])]);
        assert!(parse_response(&far, 2).is_err());
        let no_status = response(vec![Item::structure(tag::BATCH_ITEM, vec![])]);
        assert!(parse_response(&no_status, 1).is_err());
        let not_a_response = Item::structure(tag::REQUEST_MESSAGE, vec![]);
        assert!(parse_response(&not_a_response, 1).is_err());
    }

    #[test]
    fn state_and_date_from_get_attributes() {
        let payload = vec![
            uid("3"),
            attribute("State", Value::Enumeration(4)),
            attribute("Initial Date", Value::DateTime(1_700_000_000)),
        ];
        assert_eq!(
            key_state(&payload).unwrap(),
            KeyState {
                state: State::Compromised,
                initial_date: 1_700_000_000
            }
        );
        assert!(key_state(&payload[..1]).is_err());
    }

    proptest! {
        /// Whatever a server sends, reading it as a response does not panic, and every
        /// accepted answer has one result per item.
        #[test]
        fn parse_never_panics(item in super::super::ttlv::tests::arb_item(), count in 1usize..5) {
            let msg = Item::structure(tag::RESPONSE_MESSAGE, vec![
                Item::structure(tag::RESPONSE_HEADER, vec![]), item.clone()]);
            if let Ok(results) = parse_response(&msg, count) {
                prop_assert_eq!(results.len(), count);
            }
            let payload = vec![item];
            let _ = (key_state(&payload), located_ids(&payload), encrypted(&payload).is_ok(),
                decrypted(&payload).is_ok(), created_id(&payload));
        }
    }
}
