//! Port mapping: asking the router in front of the node to forward its ports.
pub(crate) mod upnp;
