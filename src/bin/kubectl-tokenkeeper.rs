//! `kubectl tokenkeeper`: connect, inspect and refresh SourceConnections
//! from a terminal, with the user's own Kubernetes credentials (so RBAC
//! decides who may connect a source). Never prints token values.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::response::Html;
use axum::routing::get;
use clap::{Parser, Subcommand};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use tokenkeeper::api::{ANNOTATION_FORCE_REFRESH, SourceConnection};
use tokenkeeper::decide::preset::resolve;
use tokenkeeper::decide::refresh::Limits;
use tokenkeeper::decide::secrets::{check_state_ownership, client_credentials};
use tokenkeeper::decide::validate::oauth_settings;
use tokenkeeper::oauth::client::{self as token_client, CodeExchange};
use tokenkeeper::oauth::destination::EndpointPolicy;
use tokenkeeper::oauth::seal::{Binding, key_number, seal_to_public_key};
use tokenkeeper::oauth::state_secret::{consented_grant, redirect_values};
use tokenkeeper::oauth::token::{ANNOTATION_ISSUED_AT, ANNOTATION_NEXT_REFRESH_AT, KEY_EXPIRES_AT};
use tokenkeeper::write::secret::store_state_secret;
use tokio::sync::mpsc;

/// Connect, inspect and refresh tokenkeeper SourceConnections.
#[derive(Parser)]
#[command(name = "kubectl tokenkeeper", version)]
struct Cli {
    /// Namespace of the SourceConnection (default: the kubeconfig's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Authorize a connection on the provider's consent page, from this
    /// machine (RFC 8252 loopback redirect), and store the grant.
    Authorize {
        name: String,
        /// Do not try to open a browser; only print the URL.
        #[arg(long)]
        no_browser: bool,
        /// Seconds to wait for the consent page to come back.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Allow plain http endpoints on this machine (development only),
        /// as the operator's flag of the same name.
        #[arg(long)]
        allow_plain_http_loopback: bool,
    },
    /// Conditions with cause and fix, token times, and recent events; without
    /// a name, every connection of the namespace (or of all, with -A) with
    /// its state, token expiry and grant expiry.
    Status {
        name: Option<String>,
        /// Every namespace (the list only).
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// `json` for the list as JSON.
        #[arg(short, long)]
        output: Option<String>,
    },
    /// Shell completion for bash, zsh or fish.
    Completion { shell: clap_complete::Shell },
    /// Ask tokenkeeper to refresh the connection's token now.
    Refresh { name: String },
    /// List the provider presets, or show what one fills in.
    Providers { name: Option<String> },
    /// Add a new sealing key to the operator's key Secret (in the namespace
    /// given with -n, the operator's). New grants are sealed with it from
    /// their next write; the older keys stay, so every grant still opens.
    RotateKey {
        /// The operator's key Secret.
        #[arg(long, default_value = "tokenkeeper-sealing-key")]
        secret: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = Client::try_default().await?;
    let namespace = cli
        .namespace
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let connections: Api<SourceConnection> = Api::namespaced(client.clone(), &namespace);
    match cli.command {
        Command::Status {
            name: Some(name), ..
        } => status(&client, &connections, &namespace, &name).await,
        Command::Status {
            name: None,
            all_namespaces,
            output,
        } => {
            let scope = (!all_namespaces).then_some(namespace.as_str());
            list(&client, scope, output.as_deref() == Some("json")).await
        }
        Command::Completion { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(
                shell,
                &mut command,
                "kubectl-tokenkeeper",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Refresh { name } => {
            let patch = serde_json::json!({"metadata": {"annotations": {ANNOTATION_FORCE_REFRESH: Timestamp::now().to_string()}}});
            connections
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            println!(
                "Refresh of {namespace}/{name} requested. Follow it with: kubectl tokenkeeper status {name} -n {namespace}"
            );
            Ok(())
        }
        Command::RotateKey { secret } => rotate_key(&client, &namespace, &secret).await,
        Command::Providers { name } => {
            print!("{}", providers_text(name.as_deref())?);
            Ok(())
        }
        Command::Authorize {
            name,
            no_browser,
            timeout,
            allow_plain_http_loopback,
        } => {
            let limits = Limits {
                endpoints: Arc::new(EndpointPolicy::new(allow_plain_http_loopback, &[])),
                ..Limits::default()
            };
            authorize(
                &client,
                &connections,
                &namespace,
                &name,
                no_browser,
                Duration::from_secs(timeout),
                &limits,
            )
            .await
        }
    }
}

async fn status(
    client: &Client,
    connections: &Api<SourceConnection>,
    namespace: &str,
    name: &str,
) -> anyhow::Result<()> {
    let conn = connections.get(name).await?;
    let method = if conn.spec.basic.is_some() {
        "Basic"
    } else if conn.spec.api_key.is_some() {
        "API key"
    } else {
        "OAuth 2.0"
    };
    println!("Name:        {name}");
    println!("Namespace:   {namespace}");
    println!("Method:      {method}");
    let status = conn.status.clone().unwrap_or_default();
    for condition in &status.conditions {
        println!(
            "{:<12} {} ({})",
            format!("{}:", condition.type_),
            printable(&condition.status),
            printable(&condition.reason)
        );
        println!("             {}", printable(&condition.message));
    }
    let show = |label: &str, value: Option<String>| {
        if let Some(value) = value {
            println!("{label:<24} {}", printable(&value));
        }
    };
    show("Secret:", status.secret_name.clone());
    // Token times live on the target Secret; its metadata and expires_at
    // are read, never the token.
    if conn.spec.oauth2.is_some() {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        if let Some(target) = secrets.get_opt(&conn.target_secret_name()).await? {
            let expires = target
                .data
                .as_ref()
                .and_then(|d| d.get(KEY_EXPIRES_AT))
                .map(|v| String::from_utf8_lossy(&v.0).into_owned());
            show("Token expires:", expires);
            let annotation = |key: &str| target.annotations().get(key).cloned();
            show("Last refresh:", annotation(ANNOTATION_ISSUED_AT));
            show("Next refresh:", annotation(ANNOTATION_NEXT_REFRESH_AT));
        }
    }
    show(
        "Retry at:",
        status.next_refresh_time.as_ref().map(|t| t.0.to_string()),
    );
    show(
        "Granted scopes:",
        (!status.granted_scopes.is_empty()).then(|| status.granted_scopes.join(" ")),
    );
    show(
        "Failed refresh attempts:",
        status.failed_refresh_attempts.map(|n| {
            let last = status
                .last_failure_time
                .as_ref()
                .map(|t| format!(" (last {})", t.0))
                .unwrap_or_default();
            format!("{n}{last}")
        }),
    );
    show("Authorize at:", status.authorization_url.clone());
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let selector = format!("involvedObject.name={name},involvedObject.kind=SourceConnection");
    let mut items = events
        .list(&ListParams::default().fields(&selector))
        .await?
        .items;
    items.sort_by_key(|e| {
        e.last_timestamp
            .clone()
            .map(|t| t.0)
            .or(e.event_time.clone().map(|t| t.0))
    });
    println!("Events:");
    if items.is_empty() {
        println!("  <none>");
    }
    for event in items.iter().rev().take(10).rev() {
        println!(
            "  {:<8} {:<24} {}",
            printable(event.type_.as_deref().unwrap_or_default()),
            printable(event.reason.as_deref().unwrap_or_default()),
            printable(event.message.as_deref().unwrap_or_default())
        );
    }
    Ok(())
}

/// One connection as `kubectl tokenkeeper status` lists it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    namespace: String,
    name: String,
    method: String,
    ready: String,
    reason: String,
    token_expires: Option<String>,
    grant_expires: Option<String>,
}

/// The row of `conn`, with the token expiry its target Secret says (never
/// its token).
fn row(conn: &SourceConnection, target: Option<&Secret>) -> Row {
    let status = conn.status.clone().unwrap_or_default();
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
    let method = match (&conn.spec.basic, &conn.spec.api_key, &conn.spec.oauth2) {
        (Some(_), _, _) => "basic".to_owned(),
        (_, Some(_), _) => "apiKey".to_owned(),
        (_, _, Some(oauth)) => match &oauth.provider {
            Some(provider) => format!("oauth2/{provider}"),
            None => "oauth2".to_owned(),
        },
        _ => "-".to_owned(),
    };
    Row {
        namespace: conn.namespace().unwrap_or_default(),
        name: conn.name_any(),
        method,
        ready: ready.map_or("-".to_owned(), |c| c.status.clone()),
        reason: ready.map_or("-".to_owned(), |c| c.reason.clone()),
        token_expires: target
            .and_then(|t| t.data.as_ref()?.get(KEY_EXPIRES_AT).cloned())
            .map(|v| String::from_utf8_lossy(&v.0).into_owned()),
        grant_expires: status.grant_expires_at.map(|t| t.0.to_string()),
    }
}

fn table(rows: &[Row]) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "{:<20} {:<24} {:<20} {:<6} {:<24} {:<22} {}\n",
        "NAMESPACE", "NAME", "METHOD", "READY", "REASON", "TOKEN EXPIRES", "GRANT EXPIRES"
    );
    for row in rows {
        let _ = writeln!(
            out,
            "{:<20} {:<24} {:<20} {:<6} {:<24} {:<22} {}",
            printable(&row.namespace),
            printable(&row.name),
            printable(&row.method),
            printable(&row.ready),
            printable(&row.reason),
            row.token_expires
                .as_deref()
                .map_or("-".to_owned(), printable),
            row.grant_expires
                .as_deref()
                .map_or("-".to_owned(), printable),
        );
    }
    out
}

/// Every connection of `namespace` (or of all), as a table or JSON.
async fn list(client: &Client, namespace: Option<&str>, json: bool) -> anyhow::Result<()> {
    let connections: Api<SourceConnection> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut rows = Vec::new();
    for conn in connections.list(&ListParams::default()).await?.items {
        let secrets: Api<Secret> =
            Api::namespaced(client.clone(), &conn.namespace().unwrap_or_default());
        // Without the right to read Secrets, the list still shows the rest.
        let target = secrets
            .get_opt(&conn.target_secret_name())
            .await
            .ok()
            .flatten();
        rows.push(row(&conn, target.as_ref()));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", table(&rows));
    }
    Ok(())
}

#[derive(Deserialize)]
struct Callback {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    /// What else the provider sent (values of `redirectFields`).
    #[serde(flatten)]
    rest: std::collections::BTreeMap<String, String>,
}

async fn authorize(
    client: &Client,
    connections: &Api<SourceConnection>,
    namespace: &str,
    name: &str,
    no_browser: bool,
    timeout: Duration,
    limits: &Limits,
) -> anyhow::Result<()> {
    let conn = connections.get(name).await?;
    let resolved = conn.spec.oauth2.as_ref().map(resolve).transpose()?;
    let oauth = resolved
        .as_ref()
        .map(|r| &r.oauth)
        .filter(|o| o.authorization_url.is_some())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{namespace}/{name} has no spec.oauth2.authorizationUrl to authorize with"
            )
        })?;
    // The endpoints are checked as the operator checks them, before any
    // request goes to them.
    oauth_settings(oauth, limits)?;
    // The grant is stored sealed to the operator's public key, which only
    // the operator can open.
    let public_key = conn
        .status
        .as_ref()
        .and_then(|s| s.grant_sealing_key.clone())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{namespace}/{name} has no status.grantSealingKey yet: tokenkeeper publishes it \
                 when it reconciles the connection. Is the operator running (kubectl get pods \
                 -A -l app.kubernetes.io/name=tokenkeeper), and as new as this plugin?"
            )
        })?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let client_secret_object = secrets.get_opt(&oauth.client.secret_ref.name).await?;
    let (client_id, client_secret) =
        client_credentials(oauth, namespace, client_secret_object.as_ref())?;

    // RFC 8252: a loopback redirect on an ephemeral port of this machine.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let redirect = format!(
        "http://127.0.0.1:{}/callback",
        listener.local_addr()?.port()
    );
    let state = oauth2::CsrfToken::new_random_len(32).secret().clone();
    let started = token_client::authorization_start(
        oauth.authorization_url.as_deref().unwrap_or_default(),
        &client_id,
        &redirect,
        &oauth.scopes,
        &oauth.authorization_params,
        &state,
    )
    .map_err(|e| anyhow::anyhow!("spec.oauth2.authorizationUrl: {e}"))?;
    let (sender, mut receiver) = mpsc::channel::<Callback>(1);
    let app = Router::new().route(
        "/callback",
        get(move |Query(callback): Query<Callback>| {
            let sender = sender.clone();
            async move {
                let _ = sender.send(callback).await;
                Html("<!doctype html><html><body style=\"font-family: sans-serif\"><h1>Back to the terminal</h1>\
                      <p>kubectl tokenkeeper received the provider's answer; you can close this window.</p></body></html>")
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!(
        "Open this URL in a browser to authorize {namespace}/{name}:\n\n  {}\n",
        started.url
    );
    if !no_browser {
        let _ = std::process::Command::new("xdg-open")
            .arg(&started.url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    let callback = tokio::time::timeout(timeout, receiver.recv())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer from the consent page within {} s",
                timeout.as_secs()
            )
        })?
        .ok_or_else(|| anyhow::anyhow!("the callback listener stopped"))?;
    if callback.state.as_deref() != Some(state.as_str()) {
        anyhow::bail!(
            "the answer does not belong to this authorization (state mismatch); nothing was stored"
        );
    }
    if let Some(error) = callback.error {
        let said = callback
            .error_description
            .map(|d| format!(" ({})", printable(&d)))
            .unwrap_or_default();
        anyhow::bail!(
            "the provider answered {}{said}; nothing was stored",
            printable(&error)
        );
    }
    let code = callback
        .code
        .ok_or_else(|| anyhow::anyhow!("the provider's answer has no code"))?;
    let http = token_client::http_client(limits.endpoints.clone())?;
    let exchange = CodeExchange {
        token_url: &oauth.token_url,
        client_id: &client_id,
        client_secret: &client_secret,
        auth_method: oauth.client.auth_method.unwrap_or_default(),
        redirect_url: &redirect,
        code: &code,
        pkce_verifier: &started.pkce_verifier,
    };
    let issued = token_client::exchange_code(&http, exchange)
        .await
        .map_err(|failure| {
            anyhow::anyhow!("the provider did not exchange the code: {failure:?}")
        })?;
    let refresh_token = issued.refresh_token.clone().ok_or_else(|| {
        anyhow::anyhow!("the provider sent no refresh token; ask for offline access (authorizationParams or the offline_access scope)")
    })?;
    let existing = secrets.get_opt(&conn.state_secret_name()).await?;
    check_state_ownership(&conn, existing.as_ref())?;
    let mut state_after = consented_grant(
        oauth,
        limits,
        &issued,
        refresh_token,
        &client_id,
        Timestamp::now(),
    )?;
    state_after.redirect_values = redirect_values(&oauth.redirect_fields, &callback.rest);
    let binding = Binding::new(&conn.uid().unwrap_or_default(), oauth, &client_id);
    let grant = state_after
        .grant()
        .ok_or_else(|| anyhow::anyhow!("the consent has no refresh token"))?;
    let sealed = seal_to_public_key(&public_key, &grant, &binding)?;
    store_state_secret(
        &secrets,
        &conn,
        existing.as_ref(),
        state_after.to_data(|_| sealed),
    )
    .await?;
    println!(
        "Stored the grant in Secret {}/{}; waiting for tokenkeeper...",
        namespace,
        conn.state_secret_name()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = connections.get(name).await?;
        let ready = now
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
        if let Some(ready) = ready.filter(|c| c.status == "True") {
            println!("{namespace}/{name} is Ready: {}", printable(&ready.message));
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "{namespace}/{name} is not Ready after 60 s; see kubectl tokenkeeper status {name} -n {namespace}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Adds `key-N` (N one more than the highest) to the key Secret, with
/// optimistic concurrency so that two rotations cannot overwrite each other.
async fn rotate_key(client: &Client, namespace: &str, name: &str) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets.get_opt(name).await?.ok_or_else(|| {
        anyhow::anyhow!(
            "no Secret {namespace}/{name}: give the operator's namespace with -n (and --secret if \
             it was renamed)"
        )
    })?;
    let highest = secret
        .data
        .iter()
        .flat_map(|d| d.keys())
        .filter_map(|entry| key_number(entry))
        .max()
        .ok_or_else(|| anyhow::anyhow!("Secret {namespace}/{name} holds no sealing key"))?;
    let entry = format!("key-{}", highest + 1);
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": secret.resource_version()},
        "data": {&entry: k8s_openapi::ByteString(key.to_vec())},
    });
    secrets
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    println!(
        "Added sealing key {entry} to Secret {namespace}/{name}. tokenkeeper seals grants with it \
         from their next refresh; keep every older key until all grants are sealed anew. Back \
         the Secret up again."
    );
    Ok(())
}

/// The catalogue as `kubectl tokenkeeper providers [NAME]` prints it.
fn providers_text(name: Option<&str>) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let catalogue = tokenkeeper::providers::catalogue();
    let mut out = String::new();
    let Some(id) = name else {
        writeln!(out, "{:<12} {:<28} PARAMETERS", "PRESET", "PROVIDER")?;
        for (id, preset) in catalogue {
            let params: Vec<&str> = preset.params.keys().map(String::as_str).collect();
            writeln!(out, "{id:<12} {:<28} {}", preset.name, params.join(", "))?;
        }
        return Ok(out);
    };
    let preset = catalogue.get(id).ok_or_else(|| {
        anyhow::anyhow!("no preset {id:?}; kubectl tokenkeeper providers lists them")
    })?;
    writeln!(out, "{} (spec.oauth2.provider: {id})", preset.name)?;
    if let Some(docs) = &preset.docs {
        writeln!(out, "  docs:                 {docs}")?;
    }
    for (param, spec) in &preset.params {
        let default = spec
            .default
            .as_deref()
            .map(|d| format!(" (default {d})"))
            .unwrap_or_default();
        writeln!(
            out,
            "  providerParams.{param}: {}{default}",
            spec.description
        )?;
    }
    writeln!(out, "  tokenUrl:             {}", preset.token_url)?;
    writeln!(out, "  authorizationUrl:     {}", preset.authorization_url)?;
    if let Some(revocation) = &preset.revocation {
        writeln!(
            out,
            "  revocationUrl:        {} ({:?})",
            revocation.url, revocation.style
        )?;
    }
    if let Some(url) = &preset.verification_url {
        writeln!(out, "  verification.url:     {url}")?;
    }
    writeln!(out, "  client.authMethod:    {:?}", preset.client_auth)?;
    writeln!(out, "  scopes:               {}", preset.scopes.join(" "))?;
    for (key, value) in &preset.authorization_params {
        writeln!(out, "  authorizationParams:  {key}={value}")?;
    }
    for (key, value) in &preset.token_params {
        writeln!(out, "  extraTokenParams:     {key}={value}")?;
    }
    if !preset.response_fields.is_empty() {
        writeln!(
            out,
            "  responseFields:       {}",
            preset.response_fields.join(", ")
        )?;
    }
    if let Some(lifetime) = &preset.default_token_lifetime {
        writeln!(out, "  defaultTokenLifetime: {lifetime}")?;
    }
    let policy = &preset.refresh_token;
    writeln!(
        out,
        "  refresh tokens:       rotation {:?}",
        policy.rotation
    )?;
    if let Some(days) = policy.idle_expiry_days {
        writeln!(
            out,
            "                        end after {days} days unused (refreshing keeps them alive)"
        )?;
    }
    if let Some(days) = policy.absolute_expiry_days {
        writeln!(
            out,
            "                        end {days} days after consent (GrantExpiring warns ahead)"
        )?;
    }
    for rule in &preset.errors {
        let test = match (&rule.equals, &rule.contains) {
            (Some(value), _) => format!("= {value}"),
            (None, Some(text)) => format!("contains {text}"),
            _ => String::new(),
        };
        writeln!(
            out,
            "  error dialect:        {} {test} -> {:?}",
            rule.field, rule.reason
        )?;
    }
    if let Some(notes) = &preset.notes {
        writeln!(out, "  notes:                {notes}")?;
    }
    Ok(out)
}

/// `text` as it may go to a terminal: what a provider or a status says
/// could carry escape sequences that rewrite the screen or the title, so
/// control characters are shown as their escapes instead.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{Secret, SourceConnection, printable, providers_text, row, table};

    #[test]
    fn the_list_shows_state_and_times_and_never_a_token() {
        let conn: SourceConnection = serde_json::from_value(serde_json::json!({
            "apiVersion": "tokenkeeper.dev/v1alpha1",
            "kind": "SourceConnection",
            "metadata": {"name": "crm", "namespace": "data"},
            "spec": {"oauth2": {"provider": "hubspot", "grant": "refreshToken",
                "client": {"secretRef": {"name": "c"}}}},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "SecretSynced",
                "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                "grantExpiresAt": "2027-01-01T00:00:00Z"}
        }))
        .unwrap();
        let target = Secret {
            data: Some(
                [
                    (
                        "expires_at".to_owned(),
                        k8s_openapi::ByteString(b"2026-12-01T18:00:00Z".to_vec()),
                    ),
                    (
                        "access_token".to_owned(),
                        k8s_openapi::ByteString(b"at-secret".to_vec()),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        };
        let rows = [row(&conn, Some(&target))];
        let text = table(&rows);
        for expected in [
            "oauth2/hubspot",
            "SecretSynced",
            "2026-12-01T18:00:00Z",
            "2027-01-01T00:00:00Z",
        ] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
        let json = serde_json::to_string(&rows).unwrap();
        assert!(json.contains("\"grantExpires\""), "{json}");
        assert!(!text.contains("at-secret") && !json.contains("at-secret"));
    }

    #[test]
    fn completion_scripts_are_generated() {
        let mut command = <super::Cli as clap::CommandFactory>::command();
        let mut out = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut command,
            "kubectl-tokenkeeper",
            &mut out,
        );
        let script = String::from_utf8(out).unwrap();
        assert!(
            script.contains("rotate-key") && script.contains("providers"),
            "{script}"
        );
    }

    #[test]
    fn providers_lists_the_presets_and_shows_one() {
        let list = providers_text(None).unwrap();
        assert!(list.lines().count() > 20, "{list}");
        assert!(
            list.contains("salesforce") && list.contains("domain"),
            "{list}"
        );
        let one = providers_text(Some("salesforce")).unwrap();
        assert!(
            one.contains("providerParams.domain") && one.contains("instance_url"),
            "{one}"
        );
        assert!(providers_text(Some("nowhere")).is_err());
    }

    #[test]
    fn control_characters_are_shown_not_sent_to_the_terminal() {
        assert_eq!(printable("plain words: ok"), "plain words: ok");
        assert_eq!(
            printable("denied\u{1b}]0;pwned\u{7}\u{1b}[2J\r\nnext"),
            "denied\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\r\\nnext"
        );
        assert!(!printable("\u{9b}31m").contains('\u{9b}'));
    }
}
