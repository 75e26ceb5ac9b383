//! Wire constants of the NBD protocol (proto.md, "Values").
//!
//! Only numbers live here; what they mean for a server is in `handshake` and
//! `transmission`.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_PLATFORM: u32 = 0x8000_0004;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 0x1;
pub const TFLAG_READ_ONLY: u16 = 0x2;
pub const TFLAG_SEND_FLUSH: u16 = 0x4;
pub const TFLAG_SEND_FUA: u16 = 0x8;
pub const TFLAG_ROTATIONAL: u16 = 0x10;
pub const TFLAG_SEND_TRIM: u16 = 0x20;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 0x40;
pub const TFLAG_SEND_DF: u16 = 0x80;
pub const TFLAG_CAN_MULTI_CONN: u16 = 0x100;
pub const TFLAG_SEND_RESIZE: u16 = 0x200;
pub const TFLAG_SEND_CACHE: u16 = 0x400;
pub const TFLAG_SEND_FAST_ZERO: u16 = 0x800;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 0x1;
pub const CMD_FLAG_NO_HOLE: u16 = 0x2;
pub const CMD_FLAG_DF: u16 = 0x4;
pub const CMD_FLAG_REQ_ONE: u16 = 0x8;
pub const CMD_FLAG_FAST_ZERO: u16 = 0x10;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 0x20;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 0x1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

// base:allocation flags.
pub const STATE_HOLE: u32 = 0x1;
pub const STATE_ZERO: u32 = 0x2;

// Error values (on the wire; not the host's errno numbering by accident).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The only meta context this library knows.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Longest string (export name, description, query) accepted, per the spec.
pub const MAX_STRING: usize = 4096;
/// Option payloads larger than this are discarded unread and answered ERR_TOO_BIG.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
