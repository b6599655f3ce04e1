//! KMIP, the protocol of HSM-backed key managers, as far as kmsfs speaks it: the TTLV codec
//! ([`ttlv`]), the request and response messages of the operations kmsfs uses ([`messages`]),
//! and the layout of a DEK wrapped by KMIP Encrypt ([`wrapped`]).
//!
//! Pure, like `format`: bytes and items in and out, no I/O, no dependency on the rest of
//! kmsfs. The backend that talks to servers is `kms::kmip`; the fuzz target `kmip` and the
//! property tests here exercise the decoders on arbitrary bytes.

pub mod messages;
pub mod ttlv;
pub mod wrapped;
