//! Wiring: what each capability needs from the others, plugged in by the
//! composition root. A capability names what it needs as a small trait in
//! its own module; the adapters here implement those traits over the
//! capability that provides it, so capability modules never import each
//! other upwards (see docs/architecture.md, "Dependencies").

pub(super) mod advertise;
pub(super) mod dht;
pub(super) mod messaging;
pub(super) mod nat;
pub(super) mod outbox;
pub(super) mod punch;
pub(super) mod relay;
pub(super) mod topics;
