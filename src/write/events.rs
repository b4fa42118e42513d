//! Events on a SourceConnection: what `kubectl describe` lists under it.

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use prometheus_client::metrics::counter::Counter;
use tracing::{debug, warn};

use crate::api::{FIELD_MANAGER, SourceConnection};
use crate::decide::status::{Note, display_name};
use crate::runtime::throttle::EventBudget;

/// events.k8s.io/v1 refuses notes longer than this.
const EVENT_NOTE_LIMIT: usize = 1024;

/// Publishes notes as events, within the Normal-event budget.
pub struct EventPublisher {
    client: Client,
    reporter: Reporter,
    budget: EventBudget,
    /// Normal events left out over the budget.
    dropped: Counter,
}

impl EventPublisher {
    pub fn new(client: Client, budget: EventBudget, dropped: Counter) -> Self {
        EventPublisher {
            client,
            reporter: Reporter::from(FIELD_MANAGER),
            budget,
            dropped,
        }
    }

    pub async fn publish(&self, conn: &SourceConnection, note: &Note) {
        if note.type_ == EventType::Normal && !self.budget.take(tokio::time::Instant::now()) {
            self.dropped.inc();
            debug!(connection = %display_name(conn), reason = %note.reason, "event dropped: over --event-qps");
            return;
        }
        let event = Event {
            type_: note.type_,
            reason: note.reason.as_str().to_owned(),
            note: Some(clip_note(&note.message)),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        // A recorder per event: a shared one keeps every event it published
        // for minutes to merge repeats, and tokenkeeper's notes rarely
        // repeat word for word (they carry the attempt and the retry time).
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        if let Err(error) = recorder.publish(&event, &conn.object_ref(&())).await {
            // An event is a courtesy; the status already carries the outcome.
            warn!(connection = %display_name(conn), %error, "could not publish event");
        }
    }

    pub async fn publish_all(&self, conn: &SourceConnection, notes: &[Note]) {
        for note in notes {
            self.publish(conn, note).await;
        }
    }
}

fn clip_note(message: &str) -> String {
    if message.len() <= EVENT_NOTE_LIMIT {
        return message.to_owned();
    }
    let mut cut = EVENT_NOTE_LIMIT - 3;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &message[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_are_clipped_on_a_character_boundary() {
        assert_eq!(clip_note("short"), "short");
        let long = "é".repeat(EVENT_NOTE_LIMIT);
        let clipped = clip_note(&long);
        assert!(clipped.len() <= EVENT_NOTE_LIMIT, "{}", clipped.len());
        assert!(clipped.ends_with("..."));
    }
}
