//! A tenant's spec cannot make the operator send its tokens and client
//! secrets where they should not go: URLs are parsed, plain http and this
//! machine are refused outside development, link-local (cloud metadata)
//! and configured networks are refused, also when a name resolves there.
//! The operator runs as in production (no --allow-plain-http-loopback).

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{OAuthServer, Operator, TestNamespace};
use serde_json::json;

const READY: Duration = Duration::from_secs(30);

fn client_credentials(name: &str, token_url: &str) -> String {
    format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: {name}\nspec:\n  oauth2:\n    \
         tokenUrl: \"{token_url}\"\n    grant: clientCredentials\n    client:\n      secretRef:\n        \
         name: crm-client\n"
    )
}

/// Counts the connections made to it, answering none.
fn listener() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            count.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (port, accepted)
}

#[test]
fn endpoints_are_checked_before_anything_is_sent() {
    let server = OAuthServer::start(json!({ "accessTokenTtl": 60 }));
    let (port, accepted) = listener();
    let ns = TestNamespace::new("endpoints");
    let _operator = Operator::start_as_in_production(&ns, &["--deny-network", "10.0.0.0/8"]);
    ns.create_client_secret("crm-client", "crm-client-secret");
    let cases = [
        (
            "plain-loopback",
            server.token_url(),
            "--allow-plain-http-loopback",
        ),
        (
            "userinfo",
            "http://localhost:x@10.0.0.5:9200/".to_owned(),
            "user name or password",
        ),
        (
            "metadata",
            "https://169.254.169.254/latest/api/token".to_owned(),
            "link-local",
        ),
        (
            "denied-network",
            "https://10.1.2.3/token".to_owned(),
            "--deny-network",
        ),
        // Passes a look at the text; resolves to loopback, which the
        // resolver the operator connects with refuses.
        (
            "resolves-to-loopback",
            format!("https://localhost:{port}/token"),
            "resolves to an address the operator does not send to: loopback",
        ),
    ];
    for (name, url, _) in &cases {
        ns.apply_ok(&client_credentials(name, url));
    }
    for (name, _, rule) in &cases {
        let message = ns.wait_ready_saying(name, "False", "InvalidSpec", READY);
        assert!(message.contains(rule), "{name}: {message}");
    }
    assert_eq!(
        server.stats()["tokenRequests"],
        0,
        "nothing reached the provider"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "nothing connected to localhost"
    );
    common::assert_no_secret_leaks(&ns, &["crm-client-secret".to_owned()]);
}
