//! Application error codes with which a receiver stops a stream or closes
//! a connection it refuses.

/// The stream did not start with a valid reach envelope.
pub const MALFORMED: u32 = 1;
/// The message exceeds [`crate::MAX_MESSAGE_LEN`].
pub const TOO_LARGE: u32 = 2;
/// The node is shutting down.
pub const SHUTTING_DOWN: u32 = 3;
/// An inbound connection carried nothing within the silent timeout.
pub const SILENT: u32 = 4;
/// A stream of a protocol nobody on the node serves (the connection
/// stays up).
pub const UNKNOWN_PROTOCOL: u32 = 5;
