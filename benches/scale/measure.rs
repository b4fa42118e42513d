//! Readings from outside the operator: /proc for a process's CPU and RSS,
//! the API server's own request counters for writes.

use std::collections::BTreeMap;

use anyhow::Context as _;
use kube::Client;

pub struct ProcessSample {
    pub cpu_seconds: f64,
    pub rss_kib: u64,
}

impl ProcessSample {
    pub fn read(pid: u32) -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name, which may contain spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("malformed stat")?
            .1
            .split_whitespace()
            .collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_default();
        Ok(ProcessSample {
            cpu_seconds: ticks / clock_ticks_per_second(),
            rss_kib,
        })
    }
}

/// CPU seconds used so far by the control plane (etcd, kube-apiserver,
/// kube-controller-manager) whose pids `tests/cluster/up.sh` recorded.
pub fn control_plane_cpu() -> f64 {
    let Ok(path) = std::env::var("TOKENKEEPER_BENCH_CONTROL_PLANE_PIDS") else {
        return 0.0;
    };
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().last()?.parse::<u32>().ok())
        .filter_map(|pid| ProcessSample::read(pid).ok())
        .map(|s| s.cpu_seconds)
        .sum()
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The `p` quantile (0..=1) of sorted values, nearest rank.
pub fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

const WRITE_VERBS: [&str; 6] = [
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];
const READ_VERBS: [&str; 2] = ["GET", "LIST"];

/// Requests the API server has answered so far, by resource (and
/// subresource), from its `apiserver_request_total` counter: writes, and
/// reads (GET and LIST; watches are long-lived and not counted).
pub struct RequestCounts {
    pub writes: BTreeMap<String, f64>,
    pub reads: BTreeMap<String, f64>,
}

pub async fn request_counts(client: &Client) -> anyhow::Result<RequestCounts> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    Ok(RequestCounts {
        writes: parse_counts(&text, &WRITE_VERBS),
        reads: parse_counts(&text, &READ_VERBS),
    })
}

fn parse_counts(text: &str, verbs: &[&str]) -> BTreeMap<String, f64> {
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_owned())
            })
        };
        if !verbs.contains(&label("verb").unwrap_or_default().as_str()) {
            continue;
        }
        let mut resource = label("resource").unwrap_or_default();
        if let Some(sub) = label("subresource").filter(|s| !s.is_empty()) {
            resource = format!("{resource}/{sub}");
        }
        let value: f64 = value.trim().parse().unwrap_or_default();
        *counts.entry(resource).or_default() += value;
    }
    counts
}

/// The process running `binary` under `root` (itself or a descendant):
/// a profiler given as wrapper starts the operator as its child.
pub fn process_running(root: u32, binary: &std::path::Path) -> Option<u32> {
    let binary = std::fs::canonicalize(binary).ok()?;
    let mut frontier = vec![root];
    while let Some(pid) = frontier.pop() {
        if std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .as_deref()
            == Some(binary.as_path())
        {
            return Some(pid);
        }
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        frontier.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    None
}
