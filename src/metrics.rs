//! Prometheus metrics. Per-connection series are computed at scrape time
//! from the SourceConnections the controller watches, so the series of a
//! deleted connection disappear with it; process-wide counters live here.
//! Token times change on every refresh and are not in the status; the
//! reconciler reports them here.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::decide::outcome::TokenTimes;
use crate::error::Reason;
use crate::runtime::object_key::{Key, key};
use crate::runtime::throttle::host_key;
use crate::runtime::wire::CachedConnection;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenRequestLabels {
    pub host: String,
    /// `success`, or the condition reason of the failure.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabels {
    pub host: String,
}

/// Token request latencies: from tens of milliseconds to the request timeout.
const TOKEN_REQUEST_BUCKETS: [f64; 11] =
    [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0];

fn token_request_histogram() -> Histogram {
    Histogram::new(TOKEN_REQUEST_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    namespace: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConditionLabels {
    namespace: String,
    name: String,
    condition: String,
    status: String,
    reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub token_requests: Family<TokenRequestLabels, Counter>,
    token_request_duration: Family<HostLabels, Histogram, fn() -> Histogram>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub leader: Gauge,
    pub events_dropped: Counter,
    pub reconcile_panics: Counter,
    pub sealing_key_restored: Counter,
    connections: Arc<ConnectionCollector>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tokenkeeper");
        let token_requests = Family::<TokenRequestLabels, Counter>::default();
        registry.register(
            "token_requests",
            "Token requests sent to providers, by token endpoint host and result",
            token_requests.clone(),
        );
        let token_request_duration =
            Family::<HostLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                token_request_histogram,
            );
        registry.register(
            "token_request_duration_seconds",
            "Time from sending a token request to its answer (or failure), by token endpoint host",
            token_request_duration.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that ended in an error, by condition reason",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ]);
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile of a SourceConnection took",
            reconcile_duration.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 when this replica holds the leader lease and writes",
            leader.clone(),
        );
        let events_dropped = Counter::default();
        registry.register(
            "events_dropped",
            "Normal events dropped for coming faster than --event-qps after a burst of --event-burst",
            events_dropped.clone(),
        );
        let reconcile_panics = Counter::default();
        registry.register(
            "reconcile_panics",
            "Reconciles stopped by a bug in tokenkeeper (a panic); the connection shows InternalError",
            reconcile_panics.clone(),
        );
        let sealing_key_restored = Counter::default();
        registry.register(
            "sealing_key_restored",
            "Times the sealing key Secret was found deleted or missing keys and was written again from the operator's memory",
            sealing_key_restored.clone(),
        );
        let connections = Arc::new(ConnectionCollector::default());
        registry.register_collector(Box::new(connections.clone()));
        Metrics {
            registry,
            token_requests,
            token_request_duration,
            reconcile_errors,
            reconcile_duration,
            leader,
            events_dropped,
            reconcile_panics,
            sealing_key_restored,
            connections,
        }
    }
}

impl Metrics {
    /// The caches whose SourceConnections the per-connection series show.
    pub fn watch(&self, store: Store<CachedConnection>) {
        self.connections
            .stores
            .lock()
            .expect("not poisoned")
            .push(store);
    }

    /// What the series of `namespace/name` show until the next report.
    pub fn report_token_times(&self, namespace: &str, name: &str, times: TokenTimes) {
        self.connections
            .token_times
            .lock()
            .expect("not poisoned")
            .insert(key(namespace, name), times);
    }

    pub fn observe_reconcile(&self, took: Duration) {
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    /// Counts a token request by its result, and how long it took.
    pub fn token_request(&self, token_url: &str, result: &str, took: Duration) {
        let host = host_key(token_url);
        self.token_request_duration
            .get_or_create(&HostLabels { host: host.clone() })
            .observe(took.as_secs_f64());
        self.token_requests
            .get_or_create(&TokenRequestLabels {
                host,
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts a reconcile that ended in `reason`.
    pub fn reconcile_error(&self, reason: Reason) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                reason: reason.as_str().to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[derive(Debug, Default)]
struct ConnectionCollector {
    stores: std::sync::Mutex<Vec<Store<CachedConnection>>>,
    /// By `namespace/name`, one allocation per connection.
    token_times: std::sync::Mutex<HashMap<Key, TokenTimes>>,
}

impl prometheus_client::collector::Collector for ConnectionCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let expiry = Family::<ConnectionLabels, Gauge<f64, AtomicU64>>::default();
        let next_refresh = Family::<ConnectionLabels, Gauge<f64, AtomicU64>>::default();
        let grant_expiry = Family::<ConnectionLabels, Gauge<f64, AtomicU64>>::default();
        let failed_attempts = Family::<ConnectionLabels, Gauge>::default();
        let conditions = Family::<ConditionLabels, Gauge>::default();
        let stores = self.stores.lock().expect("not poisoned").clone();
        let mut token_times = self.token_times.lock().expect("not poisoned");
        let mut live = HashMap::with_capacity(token_times.len());
        for conn in stores.iter().flat_map(Store::state) {
            let labels = ConnectionLabels {
                namespace: conn.namespace().unwrap_or_default(),
                name: conn.name_any(),
            };
            let key = key(&labels.namespace, &labels.name);
            if let Some(times) = token_times.remove(&key) {
                if let Some(t) = times.expires_at {
                    expiry.get_or_create(&labels).set(t.as_second() as f64);
                }
                if let Some(t) = times.next_action_at {
                    next_refresh
                        .get_or_create(&labels)
                        .set(t.as_second() as f64);
                }
                live.insert(key, times);
            }
            let Ok(Some(status)) = conn.status() else {
                continue;
            };
            failed_attempts
                .get_or_create(&labels)
                .set(i64::from(status.failed_refresh_attempts.unwrap_or(0)));
            if let Some(end) = &status.grant_expires_at {
                grant_expiry
                    .get_or_create(&labels)
                    .set(end.0.as_second() as f64);
            }
            for condition in &status.conditions {
                conditions
                    .get_or_create(&ConditionLabels {
                        namespace: labels.namespace.clone(),
                        name: labels.name.clone(),
                        condition: condition.type_.clone(),
                        status: condition.status.clone(),
                        reason: condition.reason.clone(),
                    })
                    .set(1);
            }
        }
        // Times of deleted connections go with this scrape.
        *token_times = live;
        drop(token_times);
        for (name, help, family) in [
            (
                "connection_token_expiry_timestamp_seconds",
                "When the access token in the connection's Secret expires (Unix time)",
                &expiry,
            ),
            (
                "connection_next_refresh_timestamp_seconds",
                "When the connection's token is refreshed next, or retried (Unix time)",
                &next_refresh,
            ),
            (
                "connection_grant_expiry_timestamp_seconds",
                "When the connection's grant ends whatever is refreshed, when known (Unix time)",
                &grant_expiry,
            ),
        ] {
            family.encode(encoder.encode_descriptor(name, help, None, family.metric_type())?)?;
        }
        failed_attempts.encode(encoder.encode_descriptor(
            "connection_failed_refresh_attempts",
            "Token requests of the connection that failed in a row",
            None,
            failed_attempts.metric_type(),
        )?)?;
        conditions.encode(encoder.encode_descriptor(
            "connection_condition",
            "1 for each condition a connection has, by type, status and reason",
            None,
            conditions.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_render_with_the_prefix() {
        let metrics = Metrics::default();
        let took = Duration::from_millis(300);
        metrics.token_request("https://login.example.com/oauth/token", "success", took);
        metrics.token_request("http://127.0.0.1:8443/token", "InvalidGrant", took);
        metrics.observe_reconcile(Duration::from_millis(20));
        metrics.leader.set(1);
        let text = metrics.render();
        assert!(
            text.contains(
                r#"tokenkeeper_token_requests_total{host="login.example.com",result="success"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"host="127.0.0.1:8443",result="InvalidGrant""#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"tokenkeeper_token_request_duration_seconds_bucket{le="0.5",host="login.example.com"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("tokenkeeper_leader 1"), "{text}");
        assert!(
            text.contains("tokenkeeper_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE tokenkeeper_connection_condition gauge"),
            "{text}"
        );
    }
}
