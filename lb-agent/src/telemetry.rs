//! Logging set-up, and the agent's own health and metrics: the state behind `/healthz`,
//! `/livez` and `/metrics` (served by [`crate::http`]).
//!
//! Health follows kube-proxy's definition, so that probes, load balancers and dashboards
//! written for kube-proxy read this agent the same way:
//! - the agent is *healthy* unless an update has been waiting longer than
//!   [`HEALTH_TIMEOUT`] to reach the maps (an update is queued when the source hands over
//!   a changed state, and applied when a sync of it succeeds); before the first
//!   successful sync it is healthy (starting up);
//! - `/healthz` also requires the node to be *eligible*: not being deleted and not tainted
//!   `ToBeDeletedByClusterAutoscaler`, so that external load balancers drain the node
//!   before it goes; `/livez` ignores the node.
//!
//! Metrics that mean what one of kube-proxy's metrics means carry its name (`kubeproxy_*`);
//! the others are `lb_*`. The text exposition is written by hand ([`Exposition`]): the
//! format is small and the set of metrics fixed.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use crate::model::{Key, Objects};
use crate::slices::CompactSlice;

/// How long a queued update may wait for a successful sync before the agent reports
/// itself unhealthy: kube-proxy's default (twice its 30 s sync period).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// The EndpointSlice annotation in which the endpoint controllers record when the change
/// that produced this version of the slice happened (a Pod or Service change).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global tracing subscriber: `filter` (EnvFilter syntax), else `LB_LOG`,
/// else `info`; written to stderr in `format`.
pub fn init_logging(filter: Option<&str>, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_env("LB_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Whether the agent is healthy at `now`, by kube-proxy's rule: nothing has been synced
/// yet (starting up), or no update is pending, or the oldest pending update has waited
/// less than `timeout`.
pub fn is_healthy(
    now: SystemTime,
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    timeout: Duration,
) -> bool {
    match (last_updated, oldest_pending) {
        (None, _) | (Some(_), None) => true,
        (Some(_), Some(queued)) => now.duration_since(queued).unwrap_or_default() < timeout,
    }
}

/// A time as Go's `time.Time.String()` prints it in UTC (`2006-01-02 15:04:05.5 +0000
/// UTC`; fractional seconds without trailing zeros), the format of kube-proxy's healthz
/// body. `None` is Go's zero time.
pub fn go_time(t: Option<SystemTime>) -> String {
    let Some(t) = t else {
        return "0001-01-01 00:00:00 +0000 UTC".to_owned();
    };
    let Ok(ts) = jiff::Timestamp::try_from(t) else {
        return "0001-01-01 00:00:00 +0000 UTC".to_owned();
    };
    let dt = ts.to_zoned(jiff::tz::TimeZone::UTC).datetime();
    let mut out = format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        dt.year(),
        dt.month(),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    );
    let nanos = dt.subsec_nanosecond();
    if nanos > 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push_str(" +0000 UTC");
    out
}

/// What `/healthz` or `/livez` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// 200 or 503.
    pub status: u16,
    /// The JSON body.
    pub body: String,
}

/// Builds the `/healthz` (`node_eligible` given) or `/livez` (`None`) answer. As in
/// kube-proxy, a healthy answer reports `lastUpdated` as the current time (older releases
/// refreshed it on every periodic sync, and clients compare the two); an unhealthy one
/// reports the last successful sync.
pub fn health_report(
    now: SystemTime,
    healthy: bool,
    last_updated: Option<SystemTime>,
    node_eligible: Option<bool>,
) -> HealthReport {
    let ok = healthy && node_eligible.unwrap_or(true);
    let last = if ok { Some(now) } else { last_updated };
    let mut body = format!(
        r#"{{"lastUpdated": "{}","currentTime": "{}""#,
        go_time(last),
        go_time(Some(now))
    );
    if let Some(eligible) = node_eligible {
        let _ = write!(body, r#", "nodeEligible": {eligible}"#);
    }
    body.push('}');
    HealthReport {
        status: if ok { 200 } else { 503 },
        body,
    }
}

/// The trigger time (see [`TRIGGER_TIME_ANNOTATION`]) an EndpointSlice carries in `new`
/// when it is new or its trigger time differs from the one it had in `old`: a change whose
/// programming latency a sync of `new` completes.
pub fn trigger_time(old: Option<&CompactSlice>, new: &CompactSlice) -> Option<SystemTime> {
    let t = new.trigger_time?;
    (old.and_then(|o| o.trigger_time) != Some(t)).then_some(t)
}

/// [`trigger_time`] of each EndpointSlice in `keys` (the ones that changed) between `old`
/// and `new`.
pub fn change_trigger_times<'a>(
    old: &Objects,
    new: &Objects,
    keys: impl IntoIterator<Item = &'a Key>,
) -> Vec<SystemTime> {
    keys.into_iter()
        .filter_map(|key| {
            let slice = new.endpoint_slices.get(key)?;
            trigger_time(old.endpoint_slices.get(key).map(|s| &**s), slice)
        })
        .collect()
}

/// A Prometheus histogram with fixed upper bounds.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: Vec<f64>,
    /// Observations per bucket (not cumulative); one more than `bounds`, for `+Inf`.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    /// A histogram with these upper bounds (ascending).
    pub fn new(bounds: Vec<f64>) -> Self {
        let counts = vec![0; bounds.len() + 1];
        Self {
            bounds,
            counts,
            sum: 0.0,
        }
    }

    /// `count` bounds from `start`, each `factor` times the previous.
    pub fn exponential(start: f64, factor: f64, count: usize) -> Self {
        let bounds = std::iter::successors(Some(start), |b| Some(b * factor))
            .take(count)
            .collect();
        Self::new(bounds)
    }

    /// kube-proxy's buckets for sync durations: 1 ms doubling up to about 16 s.
    pub fn sync_durations() -> Self {
        Self::exponential(0.001, 2.0, 15)
    }

    /// kube-proxy's buckets for network programming latency: 0.25 s and 0.5 s, every
    /// second to 59 s, every 5 s to 115 s, every 30 s to 5 min.
    pub fn programming_latency() -> Self {
        let mut bounds = vec![0.25, 0.5];
        bounds.extend((1..=59).map(f64::from));
        bounds.extend((0..12).map(|i| f64::from(60 + 5 * i)));
        bounds.extend((0..7).map(|i| f64::from(120 + 30 * i)));
        Self::new(bounds)
    }

    /// Records one observation, in seconds.
    pub fn observe(&mut self, value: f64) {
        let idx = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[idx] += 1;
        self.sum += value;
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Prometheus text exposition format (version 0.0.4), written family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// The content type of [`Exposition`] output.
pub const EXPOSITION_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Exposition {
    /// Starts a metric family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', r"\\")
                    .replace('"', "\\\"")
                    .replace('\n', r"\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }

    /// A whole single-sample family.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A whole histogram family: cumulative `_bucket` lines, `_sum` and `_count`.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (bound, count) in h.bounds.iter().zip(&h.counts) {
            cumulative += count;
            let le = format_value(*bound);
            self.sample(&bucket, &[("le", &le)], cumulative as f64);
        }
        self.sample(&bucket, &[("le", "+Inf")], h.count() as f64);
        self.sample(&format!("{name}_sum"), &[], h.sum);
        self.sample(&format!("{name}_count"), &[], h.count() as f64);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

fn unix_seconds(t: Option<SystemTime>) -> f64 {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Which path a sync took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// Every frontend examined (the first sync).
    Full,
    /// Only the frontends of changed Services.
    Partial,
}

struct State {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    last_queued: Option<SystemTime>,
    sync_all: Histogram,
    sync_full: Histogram,
    sync_partial: Histogram,
    programming: Histogram,
    sync_errors: BTreeMap<&'static str, u64>,
    watch_restarts: BTreeMap<&'static str, u64>,
    problems: usize,
    healthz: BTreeMap<u16, u64>,
    livez: BTreeMap<u16, u64>,
}

/// The agent's health and metrics state, shared by the source, the sync loop and the HTTP
/// servers.
pub struct Telemetry {
    started: SystemTime,
    health_timeout: Duration,
    state: Mutex<State>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new(HEALTH_TIMEOUT)
    }
}

impl Telemetry {
    /// Fresh state; the agent counts as started now.
    pub fn new(health_timeout: Duration) -> Self {
        Self {
            started: SystemTime::now(),
            health_timeout,
            state: Mutex::new(State {
                last_updated: None,
                oldest_pending: None,
                last_queued: None,
                sync_all: Histogram::sync_durations(),
                sync_full: Histogram::sync_durations(),
                sync_partial: Histogram::sync_durations(),
                programming: Histogram::programming_latency(),
                sync_errors: BTreeMap::new(),
                watch_restarts: BTreeMap::new(),
                problems: 0,
                healthz: BTreeMap::new(),
                livez: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Counters stay meaningful even if a holder panicked mid-update.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A changed state was handed to the sync loop and is not in the maps yet.
    pub fn queued(&self) {
        let now = SystemTime::now();
        let mut s = self.lock();
        s.oldest_pending.get_or_insert(now);
        s.last_queued = Some(now);
    }

    /// A sync finished: `Ok` with the trigger times it completed (see
    /// [`change_trigger_times`]), or `Err` with the failure's metric label.
    pub fn synced(
        &self,
        kind: SyncKind,
        took: Duration,
        result: Result<&[SystemTime], &'static str>,
    ) {
        let now = SystemTime::now();
        let mut s = self.lock();
        let secs = took.as_secs_f64();
        s.sync_all.observe(secs);
        match kind {
            SyncKind::Full => s.sync_full.observe(secs),
            SyncKind::Partial => s.sync_partial.observe(secs),
        }
        match result {
            Ok(triggers) => {
                s.last_updated = Some(now);
                s.oldest_pending = None;
                // As kube-proxy does, changes from before this agent started say nothing
                // about its programming latency.
                for t in triggers.iter().filter(|t| **t >= self.started) {
                    let latency = now.duration_since(*t).unwrap_or_default();
                    s.programming.observe(latency.as_secs_f64());
                }
            }
            Err(label) => *s.sync_errors.entry(label).or_default() += 1,
        }
    }

    /// `n` errors of kind `label` during a sync that otherwise completed (a Service that
    /// could not be programmed).
    pub fn sync_errors(&self, label: &'static str, n: usize) {
        if n > 0 {
            *self.lock().sync_errors.entry(label).or_default() += n as u64;
        }
    }

    /// The number of configuration problems currently reported.
    pub fn set_problems(&self, n: usize) {
        self.lock().problems = n;
    }

    /// A watch of `resource` failed and is being restarted.
    pub fn watch_restarted(&self, resource: &'static str) {
        *self.lock().watch_restarts.entry(resource).or_default() += 1;
    }

    /// Whether the agent is healthy now (ignoring the node), and its last successful sync.
    fn health(&self, now: SystemTime) -> (bool, Option<SystemTime>) {
        let s = self.lock();
        let healthy = is_healthy(now, s.last_updated, s.oldest_pending, self.health_timeout);
        (healthy, s.last_updated)
    }

    /// Whether the agent is healthy now, by the `/livez` rule (the node aside), without
    /// counting an answer: kube-proxy's `serviceProxyHealthy` on health-check node ports.
    pub fn healthy(&self) -> bool {
        self.health(SystemTime::now()).0
    }

    /// The `/healthz` answer, counted in `kubeproxy_proxy_healthz_total`.
    pub fn healthz(&self, node_eligible: bool) -> HealthReport {
        let now = SystemTime::now();
        let (healthy, last) = self.health(now);
        let report = health_report(now, healthy, last, Some(node_eligible));
        *self.lock().healthz.entry(report.status).or_default() += 1;
        report
    }

    /// The `/livez` answer, counted in `kubeproxy_proxy_livez_total`.
    pub fn livez(&self) -> HealthReport {
        let now = SystemTime::now();
        let (healthy, last) = self.health(now);
        let report = health_report(now, healthy, last, None);
        *self.lock().livez.entry(report.status).or_default() += 1;
        report
    }

    /// Writes the control-plane metrics.
    pub fn expose(&self, out: &mut Exposition) {
        let s = self.lock();
        out.histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Time a sync of the service tables into the BPF maps took, in seconds (full and partial)",
            &s.sync_all,
        );
        out.histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "Time a full sync (every frontend examined) took, in seconds",
            &s.sync_full,
        );
        out.histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "Time a partial sync (frontends of changed Services only) took, in seconds",
            &s.sync_partial,
        );
        out.single(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "gauge",
            "The last time the service tables were successfully synced (Unix seconds)",
            unix_seconds(s.last_updated),
        );
        out.single(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "gauge",
            "The last time a sync of the service tables was queued (Unix seconds)",
            unix_seconds(s.last_queued),
        );
        out.histogram(
            "kubeproxy_network_programming_duration_seconds",
            "Time from an EndpointSlice change (its last-change-trigger-time) to the maps holding it, in seconds",
            &s.programming,
        );
        for (name, help, counts) in [
            (
                "kubeproxy_proxy_healthz_total",
                "Answers of /healthz by HTTP status",
                &s.healthz,
            ),
            (
                "kubeproxy_proxy_livez_total",
                "Answers of /livez by HTTP status",
                &s.livez,
            ),
        ] {
            out.family(name, "counter", help);
            for code in [200, 503] {
                let code_text = code.to_string();
                let n = counts.get(&code).copied().unwrap_or(0);
                out.sample(name, &[("code", &code_text)], n as f64);
            }
        }
        out.family(
            "lb_sync_errors_total",
            "counter",
            "Syncs that failed (read_maps) and Services that could not be programmed (program_service)",
        );
        // The usual labels are always present (at 0), so that rates work from the start.
        let mut errors = BTreeMap::from([("read_maps", 0), ("program_service", 0)]);
        errors.extend(&s.sync_errors);
        for (label, n) in errors {
            out.sample("lb_sync_errors_total", &[("error", label)], n as f64);
        }
        out.family(
            "lb_watch_restarts_total",
            "counter",
            "Kubernetes API watches that failed and were restarted with backoff, by resource",
        );
        for (resource, n) in &s.watch_restarts {
            out.sample(
                "lb_watch_restarts_total",
                &[("resource", resource)],
                *n as f64,
            );
        }
        out.single(
            "lb_config_problems",
            "gauge",
            "Configuration problems currently reported (objects or files the agent cannot use)",
            s.problems as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::discovery::v1::EndpointSlice;

    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn health_follows_kube_proxy() {
        let timeout = Duration::from_secs(60);
        // Starting up: healthy whatever is queued.
        assert!(is_healthy(at(1000), None, Some(at(1)), timeout));
        // Synced, nothing pending.
        assert!(is_healthy(at(1000), Some(at(10)), None, timeout));
        // Pending, but not late yet.
        assert!(is_healthy(at(1000), Some(at(10)), Some(at(941)), timeout));
        // Pending for the whole timeout.
        assert!(!is_healthy(at(1000), Some(at(10)), Some(at(940)), timeout));
    }

    #[test]
    fn health_bodies() {
        let now = at(1_700_000_000) + Duration::from_millis(250);
        let ok = health_report(now, true, Some(at(5)), Some(true));
        assert_eq!(ok.status, 200);
        assert_eq!(
            ok.body,
            r#"{"lastUpdated": "2023-11-14 22:13:20.25 +0000 UTC","currentTime": "2023-11-14 22:13:20.25 +0000 UTC", "nodeEligible": true}"#
        );
        // A node being deleted fails /healthz but not /livez.
        let draining = health_report(now, true, Some(at(1_700_000_000)), Some(false));
        assert_eq!(draining.status, 503);
        assert!(
            draining
                .body
                .starts_with(r#"{"lastUpdated": "2023-11-14 22:13:20 +0000 UTC""#)
        );
        assert!(draining.body.ends_with(r#""nodeEligible": false}"#));
        let live = health_report(now, true, None, None);
        assert_eq!(live.status, 200);
        assert!(!live.body.contains("nodeEligible"));
        let never = health_report(now, false, None, None);
        assert_eq!(never.status, 503);
        assert!(
            never
                .body
                .contains(r#""lastUpdated": "0001-01-01 00:00:00 +0000 UTC""#)
        );
        for r in [ok, draining, live, never] {
            serde_json::from_str::<serde_json::Value>(&r.body).expect("valid JSON");
        }
    }

    #[test]
    fn exposition_format() {
        let mut h = Histogram::new(vec![0.5, 1.0]);
        h.observe(0.25);
        h.observe(0.75);
        h.observe(3.0);
        let mut out = Exposition::default();
        out.histogram("x_seconds", "A test\nhistogram", &h);
        out.family("y_total", "counter", "Y");
        out.sample("y_total", &[("a", "q\"uo\\te\n"), ("b", "c")], 2.0);
        assert_eq!(
            out.finish(),
            "# HELP x_seconds A test\\nhistogram\n\
             # TYPE x_seconds histogram\n\
             x_seconds_bucket{le=\"0.5\"} 1\n\
             x_seconds_bucket{le=\"1\"} 2\n\
             x_seconds_bucket{le=\"+Inf\"} 3\n\
             x_seconds_sum 4\n\
             x_seconds_count 3\n\
             # HELP y_total Y\n\
             # TYPE y_total counter\n\
             y_total{a=\"q\\\"uo\\\\te\\n\",b=\"c\"} 2\n"
        );
    }

    #[test]
    fn kube_proxy_buckets() {
        let sync = Histogram::sync_durations();
        assert_eq!(sync.bounds.len(), 15);
        assert_eq!(sync.bounds[14], 16.384);
        let prog = Histogram::programming_latency();
        assert_eq!(prog.bounds.len(), 2 + 59 + 12 + 7);
        assert_eq!(prog.bounds.last(), Some(&300.0));
        assert!(prog.bounds.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn trigger_times_of_changed_slices_only() {
        let slice = |t: Option<&str>| {
            let mut s = EndpointSlice::default();
            if let Some(t) = t {
                s.metadata.annotations =
                    Some([(TRIGGER_TIME_ANNOTATION.to_owned(), t.to_owned())].into());
            }
            Arc::new(CompactSlice::from(s))
        };
        let key = |n: &str| ("default".to_owned(), n.to_owned());
        let mut old = Objects::default();
        old.endpoint_slices
            .insert(key("same"), slice(Some("2026-01-01T00:00:00Z")));
        old.endpoint_slices
            .insert(key("moved"), slice(Some("2026-01-01T00:00:00Z")));
        let mut new = old.clone();
        new.endpoint_slices
            .insert(key("moved"), slice(Some("2026-01-01T00:00:05Z")));
        new.endpoint_slices
            .insert(key("added"), slice(Some("2026-01-01T00:00:07Z")));
        new.endpoint_slices.insert(key("bare"), slice(None));
        new.endpoint_slices
            .insert(key("junk"), slice(Some("yesterday")));
        // Every key, changed or not: unchanged trigger times are not counted again.
        let mut got = change_trigger_times(&old, &new, new.endpoint_slices.keys());
        got.sort();
        let base = SystemTime::from("2026-01-01T00:00:00Z".parse::<jiff::Timestamp>().unwrap());
        assert_eq!(
            got,
            vec![base + Duration::from_secs(5), base + Duration::from_secs(7)]
        );
    }
}
