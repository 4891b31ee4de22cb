//! reach-sim: a deterministic discrete-event simulator for reach-proto.
//!
//! The simulator drives reach-proto's sans-IO code with *virtual* time: no
//! sockets, no sleeping, no threads. Events sit in a priority queue ordered by
//! (time, insertion order) and a seeded RNG decides latency jitter and loss,
//! so the same seed always yields the same run, and a run of many nodes costs
//! only the CPU its events need.
//!
//! Scenarios live in [`scenarios`]; the engine pieces are [`engine`] (the
//! event queue and clock), [`rng`] (a small seeded PRNG) and [`net`] (the
//! link model: latency, jitter, loss).

pub mod engine;
pub mod net;
pub mod rng;
pub mod scenarios;
pub mod stats;
