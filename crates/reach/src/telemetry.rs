//! Telemetry seam: each module declares its metrics once, next to its code.
//!
//! A module writes one `metrics!` block. It generates two
//! structs:
//!
//! - the *group*: one `AtomicU64` per counter the module bumps itself
//!   (`stats::bump(&group.field)`), and a `snapshot()`;
//! - the *snapshot*: a plain `u64` per metric, serialized under the metric's
//!   name, listing itself through [`MetricGroup`] as `(name, help, kind,
//!   value)` (what a Prometheus exposition needs).
//!
//! Values the module does not keep as atomics (a table's size, a count kept
//! under a lock elsewhere) are declared `external`: the snapshot starts them
//! at zero and the module's own `stats()` fills them in.
//!
//! [`NodeStats`](crate::node::NodeStats) is assembled from the snapshots by
//! `node_stats!`, which flattens them into one JSON
//! object (the field names `reach status --json`, `/v1/stats` and
//! `/v1/status` have always had) and lists every group's metrics. A
//! `metrics!` group that is missing from `node_stats!` does not compile:
//! the snapshot must implement [`Assembled`], which only `node_stats!`
//! implements.

/// Whether a metric only grows (a counter) or goes up and down (a gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Counts events since the node started; never decreases.
    Counter,
    /// A level now (a table size, connections open).
    Gauge,
}

impl MetricKind {
    /// The Prometheus `# TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
        }
    }
}

/// One metric a group declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    /// The name in the stats JSON (and the future Prometheus name, prefixed).
    pub name: &'static str,
    /// The metric's doc comment, one line.
    pub help: &'static str,
    pub kind: MetricKind,
}

/// A snapshot of metrics that can list itself.
pub trait MetricGroup {
    /// Calls `f` with every metric and its value, in declaration order.
    fn for_each(&self, f: &mut dyn FnMut(&Metric, u64));

    /// Every metric with its value.
    fn metrics(&self) -> Vec<(Metric, u64)> {
        let mut v = Vec::new();
        self.for_each(&mut |m, x| v.push((*m, x)));
        v
    }
}

/// Implemented only by the snapshots [`NodeStats`](crate::node::NodeStats)
/// holds (by `node_stats!`), so a group left out of it fails to compile.
#[diagnostic::on_unimplemented(
    message = "the metric group `{Self}` is not part of `NodeStats`",
    label = "declared here but missing from `node_stats!`",
    note = "add it as a field of `node_stats!` in crates/reach/src/node/stats.rs"
)]
pub trait Assembled: MetricGroup {}

#[doc(hidden)]
pub const fn require_assembled<T: Assembled>() {}

macro_rules! metric_kind {
    (counter) => {
        $crate::telemetry::MetricKind::Counter
    };
    (gauge) => {
        $crate::telemetry::MetricKind::Gauge
    };
}

macro_rules! metric_name {
    ($field:ident) => {
        stringify!($field)
    };
    ($field:ident $name:literal) => {
        $name
    };
}

/// Declares a module's metrics once: an atomic group and its snapshot.
///
/// ```ignore
/// crate::telemetry::metrics! {
///     /// Counters of the DHT.
///     pub(crate) struct DhtCounters => pub struct DhtStats;
///     atomic {
///         /// Lookups started.
///         counter lookups = "dht_lookups",
///     }
///     external {
///         /// Contacts in the routing table now.
///         gauge routing_table_size = "dht_routing_table_size",
///     }
/// }
/// ```
///
/// Each entry is `counter` or `gauge`, a field name, and optionally the
/// metric's name when it is not the field name. Its doc comment is the help
/// text.
macro_rules! metrics {
    (
        $(#[$gmeta:meta])*
        $gvis:vis struct $Group:ident => $(#[$smeta:meta])* pub struct $Stats:ident;
        atomic {
            $(
                $(#[doc = $ahelp:literal])*
                $akind:ident $afield:ident $(= $aname:literal)?
            ),* $(,)?
        }
        $(external {
            $(
                $(#[doc = $ehelp:literal])*
                $ekind:ident $efield:ident $(= $ename:literal)?
            ),* $(,)?
        })?
    ) => {
        $(#[$gmeta])*
        #[derive(Debug, Default)]
        $gvis struct $Group {
            $(
                $(#[doc = $ahelp])*
                pub $afield: ::std::sync::atomic::AtomicU64,
            )*
        }

        impl $Group {
            /// The counters now; `external` values are zero (the owner
            /// fills them in).
            pub fn snapshot(&self) -> $Stats {
                $Stats {
                    $($afield: self.$afield.load(::std::sync::atomic::Ordering::Relaxed),)*
                    $($($efield: 0,)*)?
                }
            }
        }

        $(#[$smeta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, ::serde::Serialize, ::serde::Deserialize)]
        #[serde(default)]
        pub struct $Stats {
            $(
                $(#[doc = $ahelp])*
                $(#[serde(rename = $aname)])?
                pub $afield: u64,
            )*
            $($(
                $(#[doc = $ehelp])*
                $(#[serde(rename = $ename)])?
                pub $efield: u64,
            )*)?
        }

        impl $Stats {
            /// Every metric this group declares, in declaration order.
            pub const METRICS: &'static [$crate::telemetry::Metric] = &[
                $($crate::telemetry::Metric {
                    name: $crate::telemetry::metric_name!($afield $($aname)?),
                    help: concat!($($ahelp),*).trim_ascii(),
                    kind: $crate::telemetry::metric_kind!($akind),
                },)*
                $($($crate::telemetry::Metric {
                    name: $crate::telemetry::metric_name!($efield $($ename)?),
                    help: concat!($($ehelp),*).trim_ascii(),
                    kind: $crate::telemetry::metric_kind!($ekind),
                },)*)?
            ];
        }

        impl $crate::telemetry::MetricGroup for $Stats {
            fn for_each(&self, f: &mut dyn FnMut(&$crate::telemetry::Metric, u64)) {
                let values = [$(self.$afield,)* $($(self.$efield,)*)?];
                for (m, v) in Self::METRICS.iter().zip(values) {
                    f(m, v);
                }
            }
        }

        const _: () = $crate::telemetry::require_assembled::<$Stats>();
    };
}

/// Declares [`NodeStats`](crate::node::NodeStats) from the groups' snapshots:
/// each flattened into the one JSON object, each listed by `for_each`.
macro_rules! node_stats {
    (
        $(#[$meta:meta])*
        pub struct $Name:ident {
            $(
                $(#[doc = $doc:literal])*
                pub $field:ident: $Group:ty,
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, ::serde::Serialize, ::serde::Deserialize)]
        pub struct $Name {
            $(
                $(#[doc = $doc])*
                #[serde(flatten)]
                pub $field: $Group,
            )*
        }

        $(impl $crate::telemetry::Assembled for $Group {})*

        impl $crate::telemetry::MetricGroup for $Name {
            fn for_each(&self, f: &mut dyn FnMut(&$crate::telemetry::Metric, u64)) {
                $($crate::telemetry::MetricGroup::for_each(&self.$field, f);)*
            }
        }
    };
}

pub(crate) use {metric_kind, metric_name, metrics, node_stats};
