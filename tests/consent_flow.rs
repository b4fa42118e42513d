//! The authorization-code flow through the operator's endpoints, driven by
//! an HTTP client with a cookie jar through `oidc-provider`'s own login and
//! consent pages, as a person's browser would go.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{OAuthServer, Operator, TestNamespace, free_port, wait_for};
use serde_json::json;

const READY: Duration = Duration::from_secs(30);

struct Setup {
    server: OAuthServer,
    ns: TestNamespace,
    _operator: Operator,
    external: String,
}

fn setup(test: &str, extra_operator_args: &[&str]) -> Setup {
    setup_with(test, extra_operator_args, "")
}

/// `setup` with `extra_spec` lines under `spec.oauth2` (`{issuer}` is the
/// provider's issuer URL).
fn setup_with(test: &str, extra_operator_args: &[&str], extra_spec: &str) -> Setup {
    let port = free_port();
    let external = format!("http://127.0.0.1:{port}");
    let server = OAuthServer::start(json!({
        "accessTokenTtl": 4,
        "redirectUris": [format!("{external}/callback")],
        "applicationType": "native",
    }));
    let ns = TestNamespace::new(test);
    let bind = format!("127.0.0.1:{port}");
    let mut args = vec!["--authorization-bind-address", bind.as_str()];
    args.extend_from_slice(extra_operator_args);
    let operator = Operator::start_with(&ns, &args);
    ns.create_client_secret("crm-client", "crm-client-secret");
    ns.apply_ok(&format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: crm\nspec:\n  oauth2:\n    \
         tokenUrl: {issuer}/token\n    authorizationUrl: {issuer}/auth\n    grant: authorizationCode\n    \
         scopes: [openid, offline_access, crm.read]\n    requiredScopes: [crm.read]\n    \
         authorizationParams:\n      prompt: consent\n    client:\n      secretRef:\n        name: crm-client\n{extra}",
        issuer = server.issuer,
        extra = extra_spec.replace("{issuer}", &server.issuer),
    ));
    Setup {
        server,
        ns,
        _operator: operator,
        external,
    }
}

/// A browser: cookies, redirects followed, every URL it went through kept.
struct Browser {
    client: reqwest::blocking::Client,
    visited: Arc<Mutex<Vec<String>>>,
}

impl Browser {
    fn new() -> Self {
        Self::with_stop(None)
    }

    /// A browser that does not follow a redirect to `prefix`, as one closed
    /// before the provider's answer reached the operator.
    fn stopping_at(prefix: &str) -> Self {
        Self::with_stop(Some(prefix.to_owned()))
    }

    fn with_stop(stop: Option<String>) -> Self {
        let visited = Arc::new(Mutex::new(Vec::new()));
        let seen = visited.clone();
        let client = reqwest::blocking::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                let url = attempt.url().to_string();
                seen.lock().unwrap().push(url.clone());
                let stop_here = stop.as_deref().is_some_and(|p| url.starts_with(p));
                if stop_here || attempt.previous().len() > 10 {
                    attempt.stop()
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .unwrap();
        Browser { client, visited }
    }

    fn get(&self, url: &str) -> (u16, String, String) {
        let response = self.client.get(url).send().expect("GET");
        let url = response.url().to_string();
        (response.status().as_u16(), url, response.text().unwrap())
    }

    /// Submits the page's form with `fields`.
    fn submit(&self, page_url: &str, page: &str, fields: &[(&str, &str)]) -> (u16, String, String) {
        let action = form_action(page).unwrap_or_else(|| panic!("a form on {page_url}:\n{page}"));
        let target = reqwest::Url::parse(page_url)
            .unwrap()
            .join(&action)
            .unwrap();
        let response = self.client.post(target).form(fields).send().expect("POST");
        let url = response.url().to_string();
        (response.status().as_u16(), url, response.text().unwrap())
    }

    fn callback_visited(&self, external: &str) -> Option<String> {
        let prefix = format!("{external}/callback");
        self.visited
            .lock()
            .unwrap()
            .iter()
            .find(|u| u.starts_with(&prefix))
            .cloned()
    }
}

fn form_action(page: &str) -> Option<String> {
    let start = page.find("action=\"")? + "action=\"".len();
    let end = page[start..].find('"')? + start;
    Some(page[start..end].replace("&amp;", "&"))
}

/// Goes through login and consent; returns the operator's final page.
fn authorize(browser: &Browser, link: &str) -> (u16, String) {
    authorize_as(browser, link, "alice")
}

/// `authorize` with the provider account `login`.
fn authorize_as(browser: &Browser, link: &str, account: &str) -> (u16, String) {
    let (_, url, login) = browser.get(link);
    assert!(
        login.contains("name=\"login\""),
        "the provider's login page at {url}:\n{login}"
    );
    let (_, url, consent) = browser.submit(
        &url,
        &login,
        &[("prompt", "login"), ("login", account), ("password", "any")],
    );
    assert!(
        consent.contains("name=\"prompt\" value=\"consent\""),
        "the consent page at {url}:\n{consent}"
    );
    let (status, _, done) = browser.submit(&url, &consent, &[("prompt", "consent")]);
    (status, done)
}

/// The link the connection's status shows: the operator's start page with
/// a single-use ticket.
fn link_of(setup: &Setup) -> String {
    let ns = &setup.ns;
    ns.wait_ready("crm", "False", "AuthorizationRequired", READY);
    next_link(setup, "")
}

/// The status's link once it is no longer `used` (a ticket opens one
/// authorization; the operator then shows a new one).
fn next_link(setup: &Setup, used: &str) -> String {
    let ns = &setup.ns;
    let start = format!("{}/authorize/{}/crm?ticket=", setup.external, ns.name);
    wait_for("a new authorization link", READY, || {
        let link = ns.jsonpath("srcconn", "crm", "{.status.authorizationUrl}");
        (link.starts_with(&start) && link.len() > start.len() + 40 && link != used)
            .then_some(link.clone())
            .ok_or(link)
    })
}

fn state_version_of(ns: &TestNamespace) -> String {
    ns.jsonpath(
        "secret",
        "crm-tokenkeeper-state",
        "{.metadata.resourceVersion}",
    )
}

#[test]
fn a_person_authorizes_through_the_operator_and_the_connection_stays_fresh() {
    let setup = setup("consent", &[]);
    let ns = &setup.ns;
    let link = link_of(&setup);
    let describe = ns.kubectl_ok(&["describe", "srcconn", "crm"]);
    assert!(
        describe.contains(&format!("Open {link} in a browser")),
        "{describe}"
    );

    let browser = Browser::new();
    let (status, page) = authorize(&browser, &link);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<h1>Connected</h1>"), "{page}");
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    assert!(ns.stored_refresh_token("crm").is_some());
    // Tokens keep being refreshed with the grant the person gave.
    let first = ns.secret_value("crm-credentials", "access_token").unwrap();
    wait_for("a refreshed token", Duration::from_secs(15), || {
        let now = ns.secret_value("crm-credentials", "access_token").unwrap();
        (now != first).then_some(()).ok_or(now)
    });
    assert_eq!(setup.server.stats()["refreshTokenReuse"], 0);

    // The same callback again is refused and changes nothing. (The
    // operator has shown a new link by now; the state Secret rests.)
    let link = next_link(&setup, &link);
    let callback = browser
        .callback_visited(&setup.external)
        .expect("the browser came back through the callback");
    let rested = state_version_of(ns);
    let (status, _, page) = browser.get(&callback);
    assert_eq!(status, 400);
    assert!(page.contains("already completed"), "{page}");
    assert_eq!(state_version_of(ns), rested);

    // A forged answer while an authorization is pending: its state is
    // compared with the pending one and refused; nothing is written.
    let (status, url, _) = Browser::new().get(&link);
    assert_eq!(status, 200, "the provider's login page at {url}");
    next_link(&setup, &link);
    let pending = state_version_of(ns);
    assert_ne!(pending, rested, "the authorization is pending");
    let (status, _, page) = Browser::new().get(&format!(
        "{}/callback?state={}:crm:forged&code=stolen",
        setup.external, ns.name
    ));
    assert_eq!(status, 400);
    assert!(page.contains("does not match"), "{page}");
    assert_eq!(state_version_of(ns), pending);

    // Revoked at the provider (the user disconnects the app), then
    // re-authorized through the link the status shows: the failure clears.
    setup.server.control("revoke-grants", json!({}));
    ns.wait_ready("crm", "False", "InvalidGrant", READY);
    let link = next_link(&setup, "");
    let message = ns.condition("crm", "Ready", "message");
    assert!(
        message.contains(&format!("open {link} in a browser")),
        "{message}"
    );
    let (status, page) = authorize(&Browser::new(), &link);
    assert_eq!(status, 200, "{page}");
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    assert_eq!(ns.condition("crm", "AuthFailed", "status"), "False");
    no_leaks(&setup);
}

#[test]
fn the_consent_endpoint_needs_the_link_and_the_browser_that_started() {
    let setup = setup("consent-authority", &[]);
    let ns = &setup.ns;
    let link = link_of(&setup);
    let rested = state_version_of(ns);

    // Reaching the port is not enough: no ticket, a wrong one, or another
    // connection's name all get the same refusal, and nothing is written.
    let start = format!("{}/authorize/{}", setup.external, ns.name);
    let mut refusals = Vec::new();
    for url in [
        format!("{start}/crm"),
        format!("{start}/crm?ticket=guessed"),
        format!("{start}/no-such-connection?ticket=guessed"),
    ] {
        let response = reqwest::blocking::get(&url).unwrap();
        assert_eq!(response.status().as_u16(), 403, "{url}");
        let headers = response.headers();
        assert_eq!(
            headers["content-security-policy"],
            "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
        );
        assert_eq!(headers["referrer-policy"], "no-referrer");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(headers["cache-control"], "no-store");
        refusals.push(response.text().unwrap());
    }
    assert!(
        refusals.iter().all(|page| *page == refusals[0]),
        "{refusals:?}"
    );
    assert!(refusals[0].contains("not valid"), "{}", refusals[0]);
    assert_eq!(state_version_of(ns), rested);

    // The link opens one authorization; used again, it is refused.
    let browser = Browser::stopping_at(&format!("{}/callback", setup.external));
    let (_, url, login) = browser.get(&link);
    assert!(login.contains("name=\"login\""), "the login page at {url}");
    let (status, _, page) = Browser::new().get(&link);
    assert_eq!(status, 403, "{page}");

    // Login and consent in the browser that started, up to the callback.
    let (_, url, consent) = browser.submit(
        &url,
        &login,
        &[("prompt", "login"), ("login", "alice"), ("password", "any")],
    );
    browser.submit(&url, &consent, &[("prompt", "consent")]);
    let answer = browser
        .callback_visited(&setup.external)
        .expect("the provider sent the browser back");
    next_link(&setup, &link);
    let pending = state_version_of(ns);

    // The provider's answer replayed from a browser without the starting
    // browser's cookie: refused, nothing stored.
    let (status, _, page) = Browser::new().get(&answer);
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("did not come back to the browser"), "{page}");
    assert_eq!(state_version_of(ns), pending);
    assert_eq!(
        ns.secret_value("crm-tokenkeeper-state", "sealed_grant"),
        None
    );

    // In the browser that started, the same answer completes it.
    let (status, _, page) = browser.get(&answer);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<h1>Connected</h1>"), "{page}");
    ns.wait_ready("crm", "True", "SecretSynced", READY);
}

/// No code, PKCE verifier, token or client secret of the flow shows in the
/// operator's log, the events or the SourceConnection.
fn no_leaks(setup: &Setup) {
    let mut secrets = setup.server.secrets_seen();
    assert!(
        secrets.len() >= 4,
        "a code, its verifier and tokens crossed the token endpoint"
    );
    secrets.push("crm-client-secret".into());
    common::assert_no_secret_leaks(&setup.ns, &secrets);
}

#[test]
fn a_denied_or_expired_authorization_stores_nothing() {
    let setup = setup(
        "consent-denied",
        &["--authorization-state-ttl-seconds", "3"],
    );
    let ns = &setup.ns;
    let link = link_of(&setup);

    // The person declines on the provider's page.
    let browser = Browser::new();
    let (_, url, _login) = browser.get(&link);
    let uid = url.rsplit('/').next().unwrap().to_owned();
    let (status, _, page) =
        browser.get(&format!("{}/interaction/{uid}/abort", setup.server.issuer));
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("Access was not granted"), "{page}");
    assert_eq!(
        ns.secret_value("crm-tokenkeeper-state", "sealed_grant"),
        None
    );
    assert_eq!(
        ns.condition("crm", "Ready", "reason"),
        "AuthorizationRequired"
    );

    // Too slow: the started authorization expires.
    let link = next_link(&setup, &link);
    let browser = Browser::new();
    let (_, url, login) = browser.get(&link);
    std::thread::sleep(Duration::from_secs(4));
    let (_, url, consent) = browser.submit(
        &url,
        &login,
        &[("prompt", "login"), ("login", "alice"), ("password", "any")],
    );
    let (status, _, page) = browser.submit(&url, &consent, &[("prompt", "consent")]);
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("expired"), "{page}");
    assert_eq!(
        ns.secret_value("crm-tokenkeeper-state", "sealed_grant"),
        None
    );
}

/// Runs `kubectl tokenkeeper ...` as a user would: the plugin found on PATH.
fn plugin(ns: &TestNamespace) -> std::process::Command {
    common::kubectl_plugin(&ns.name)
}

/// The lines a running plugin prints.
type PluginLines = std::io::Lines<std::io::BufReader<std::process::ChildStdout>>;

/// `kubectl tokenkeeper authorize crm` started as a user starts it; the
/// process, the rest of what it prints, and the consent URL it printed.
fn plugin_authorize(setup: &Setup) -> (std::process::Child, PluginLines, String) {
    use std::io::{BufRead, BufReader};
    let mut child = plugin(&setup.ns)
        .args(["authorize", "crm", "--no-browser", "--timeout", "60"])
        .arg("--allow-plain-http-loopback")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let prefix = format!("{}/auth?", setup.server.issuer);
    let url = loop {
        let line = lines.next().expect("the plugin prints the URL").unwrap();
        if let Some(query) = line.trim().strip_prefix(&prefix) {
            break format!("{prefix}{query}");
        }
    };
    (child, lines, url)
}

#[test]
fn kubectl_tokenkeeper_authorizes_from_the_terminal_then_shows_and_refreshes() {
    let setup = setup("plugin", &[]);
    let ns = &setup.ns;
    link_of(&setup);

    let (mut authorize, lines, url) = plugin_authorize(&setup);
    assert!(
        url.contains("code_challenge_method=S256")
            && url.contains("redirect_uri=http%3A%2F%2F127.0.0.1%3A"),
        "{url}"
    );
    let (status, page) = authorize_at(&url);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Back to the terminal"), "{page}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let outcome = authorize.wait().unwrap();
    assert!(outcome.success(), "plugin failed: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("is Ready")), "{rest:?}");
    ns.wait_ready("crm", "True", "SecretSynced", READY);

    let listed = plugin(ns).args(["status"]).output().unwrap();
    let list = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed.status.success() && list.contains("crm") && list.contains("SecretSynced"),
        "{list}"
    );
    let json = plugin(ns).args(["status", "-o", "json"]).output().unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(rows[0]["name"], "crm", "{rows}");
    assert!(rows[0]["tokenExpires"].is_string(), "{rows}");
    let status = plugin(ns).args(["status", "crm"]).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.status.success(), "{text}");
    for expected in [
        "Ready:       True (SecretSynced)",
        "AuthFailed:  False (NotRejected)",
        "Token expires:",
        "Next refresh:",
        "Events:",
    ] {
        assert!(text.contains(expected), "{expected} in\n{text}");
    }
    let access_token = ns.secret_value("crm-credentials", "access_token").unwrap();
    let refresh_token = ns.stored_refresh_token("crm").unwrap();
    assert!(
        !text.contains(&access_token) && !text.contains(&refresh_token),
        "no token values"
    );

    let before = access_token;
    let refresh = plugin(ns).args(["refresh", "crm"]).output().unwrap();
    assert!(
        refresh.status.success(),
        "{}",
        String::from_utf8_lossy(&refresh.stderr)
    );
    wait_for("a forced refresh", READY, || {
        let now = ns.secret_value("crm-credentials", "access_token").unwrap();
        (now != before).then_some(()).ok_or(now)
    });
}

/// Login and consent at the provider for a consent URL; returns the last page.
fn authorize_at(url: &str) -> (u16, String) {
    authorize(&Browser::new(), url)
}

/// Headless Chromium driven over WebDriver (Debian's chromium and
/// chromedriver). Stopped on drop.
struct Chromium {
    driver: std::process::Child,
    base: String,
    session: String,
    http: reqwest::blocking::Client,
    _profile: tempfile::TempDir,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Chromium {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// A browser started with more command-line arguments.
    fn start_with(extra_args: &[String]) -> Self {
        let port = free_port();
        let driver = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start chromedriver (tests/tools/install-chromium.sh installs it)");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::blocking::Client::new();
        let profile = tempfile::tempdir().unwrap();
        let mut chromium = Chromium {
            driver,
            base,
            session: String::new(),
            http,
            _profile: profile,
        };
        wait_for("chromedriver", Duration::from_secs(20), || {
            chromium
                .http
                .get(format!("{}/status", chromium.base))
                .send()
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1000,700",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain(extra_args.iter().cloned())
        .chain([format!(
            "--user-data-dir={}",
            chromium._profile.path().display()
        )])
        .collect::<Vec<_>>();
        let created = chromium.call(
            "POST",
            "/session",
            json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}}}}),
        );
        chromium.session = created["sessionId"]
            .as_str()
            .expect("a WebDriver session")
            .to_owned();
        chromium
    }

    fn call(&self, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
        let url = format!("{}{path}", self.base);
        let request = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let answer: serde_json::Value = request
            .send()
            .and_then(|r| r.json())
            .expect("WebDriver answers");
        answer["value"].clone()
    }

    fn session(&self, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn open(&self, url: &str) {
        self.session("POST", "/url", json!({ "url": url }));
    }

    fn element(&self, css: &str) -> String {
        wait_for(&format!("element {css}"), Duration::from_secs(20), || {
            let found = self.session(
                "POST",
                "/element",
                json!({"using": "css selector", "value": css}),
            );
            found[ELEMENT]
                .as_str()
                .map(str::to_owned)
                .ok_or(found.to_string())
        })
    }

    fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css);
        self.session(
            "POST",
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        );
    }

    fn click(&self, css: &str) {
        let element = self.element(css);
        self.session("POST", &format!("/element/{element}/click"), json!({}));
    }

    fn source(&self) -> String {
        self.session("GET", "/source", json!({}))
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let encoded = self.session("GET", "/screenshot", json!({}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .http
                .delete(format!("{}/session/{}", self.base, self.session))
                .send();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn a_person_authorizes_in_a_real_browser() {
    let setup = setup("consent-browser", &[]);
    let ns = &setup.ns;
    let link = link_of(&setup);
    let browser = Chromium::start();
    browser.open(&link);
    browser.type_into("input[name=login]", "alice");
    browser.type_into("input[name=password]", "any");
    browser.click("button[type=submit]");
    wait_for("the consent page", READY, || {
        let page = browser.source();
        page.contains("value=\"consent\"").then_some(()).ok_or(page)
    });
    browser.click("button[type=submit]");
    wait_for("the success page", READY, || {
        let page = browser.source();
        page.contains("<h1>Connected</h1>")
            .then_some(())
            .ok_or(page)
    });
    let screenshot = common::artifacts_dir().join("consent-success.png");
    browser.screenshot(&screenshot);
    assert!(
        std::fs::metadata(&screenshot).unwrap().len() > 1000,
        "a real screenshot"
    );
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    no_leaks(&setup);
}

/// S256 of a PKCE verifier (RFC 7636 section 4.2).
fn code_challenge(verifier: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier))
}

#[test]
fn consented_grants_and_verifiers_never_sit_in_a_secret_in_plaintext() {
    let setup = setup("sealed-consent", &[]);
    let ns = &setup.ns;
    let link = link_of(&setup);
    // A Secret of someone else's under the target name: the grant cannot be
    // moved into the target, so it stays where the consent put it.
    ns.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "crm-credentials",
        "--from-literal=owner=someone-else",
    ]);
    // A Secret that is not the operator's wakes no connection; a change does.
    ns.kubectl_ok(&["annotate", "srcconn", "crm", "example.com/poke=1"]);
    ns.wait_ready("crm", "False", "TargetSecretConflict", READY);

    // Consent started, the provider's answer not yet back: the PKCE
    // verifier waits in the state Secret, sealed.
    let browser = Browser::stopping_at(&format!("{}/callback", setup.external));
    let (status, _) = authorize(&browser, &link);
    assert!(
        (300..400).contains(&status),
        "stopped at the callback: {status}"
    );
    let challenge = {
        let visited = browser.visited.lock().unwrap();
        let auth = visited
            .iter()
            .find(|u| u.starts_with(&format!("{}/auth?", setup.server.issuer)))
            .expect("the provider's authorization URL")
            .clone();
        let url = reqwest::Url::parse(&auth).unwrap();
        url.query_pairs()
            .find(|(k, _)| k == "code_challenge")
            .map(|(_, v)| v.into_owned())
            .expect("a PKCE challenge")
    };
    let stored = ns
        .secret_value(
            "crm-tokenkeeper-state",
            "pending_authorization_pkce_verifier",
        )
        .expect("the pending authorization keeps its verifier");
    assert_ne!(
        code_challenge(&stored),
        challenge,
        "the verifier is stored in plaintext"
    );

    // The answer comes back: the grant is stored for the leader, sealed.
    let answer = browser
        .callback_visited(&setup.external)
        .expect("the provider sent the browser back");
    let (status, _, page) = browser.get(&answer);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Connected"), "{page}");
    assert!(
        ns.secret_value("crm-tokenkeeper-state", "sealed_grant")
            .is_some()
    );
    std::thread::sleep(Duration::from_secs(2));
    ns.wait_ready("crm", "False", "TargetSecretConflict", READY);
    common::assert_no_secret_holds(&ns.name, &setup.server.grant_secrets_seen());

    // `kubectl tokenkeeper authorize` seals to the operator's public key.
    let public_key = ns.jsonpath("srcconn", "crm", "{.status.grantSealingKey}");
    assert!(public_key.starts_with("x25519:"), "{public_key}");
    let (authorize_cmd, mut lines, url) = plugin_authorize(&setup);
    let before = setup.server.grant_secrets_seen().len();
    let (status, page) = authorize_at(&url);
    assert_eq!(status, 200, "{page}");
    loop {
        let line = lines.next().expect("the plugin says it stored").unwrap();
        if line.contains("Stored the grant") {
            break;
        }
    }
    let seen = setup.server.grant_secrets_seen();
    assert!(seen.len() > before, "the plugin's exchange was seen");
    common::assert_no_secret_holds(&ns.name, &seen);

    // Once the name is free, the operator opens the plugin's grant.
    ns.kubectl_ok(&["delete", "secret", "crm-credentials", "--wait=false"]);
    ns.kubectl_ok(&[
        "annotate",
        "srcconn",
        "crm",
        "example.com/poke=2",
        "--overwrite",
    ]);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let outcome = authorize_cmd.wait_with_output().unwrap();
    assert!(
        outcome.status.success(),
        "plugin failed: {rest:?} {}",
        String::from_utf8_lossy(&outcome.stderr)
    );
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    common::assert_no_secret_holds(&ns.name, &setup.server.grant_secrets_seen());
}

/// A consent by another provider account than the grant in use is named
/// in the status and an event, and the grant it replaces is revoked.
#[test]
fn a_consent_by_another_account_is_named_and_the_replaced_grant_revoked() {
    let setup = setup_with(
        "consent-account",
        &[],
        "    revocationUrl: {issuer}/token/revocation\n",
    );
    let ns = &setup.ns;
    let link = link_of(&setup);
    let (status, page) = authorize_as(&Browser::new(), &link, "alice");
    assert_eq!(status, 200, "{page}");
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    common::wait_for("the account in the status", READY, || {
        let account = ns.jsonpath("srcconn", "crm", "{.status.authorizedAccount}");
        (account == "alice").then_some(()).ok_or(account)
    });
    let link = next_link(&setup, &link);
    let (status, page) = authorize_as(&Browser::new(), &link, "bob");
    assert_eq!(status, 200, "{page}");
    common::wait_for("the new account in the status", READY, || {
        let account = ns.jsonpath("srcconn", "crm", "{.status.authorizedAccount}");
        (account == "bob").then_some(()).ok_or(account)
    });
    let events = ns.kubectl_ok(&["get", "events", "-o", "wide"]);
    assert!(
        events.contains("the grant of ANOTHER account, \"alice\", revoked at the provider"),
        "{events}"
    );
    // The refresh token revoked is alice's grant's: it no longer works,
    // and bob's grant goes on.
    let revoked: Vec<String> = setup.server.stats()["revocationRequests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["kind"] == "RefreshToken" && r["status"] == 200)
        .filter_map(|r| r["token"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert!(!setup.server.is_active(&revoked[0]));
    ns.wait_ready("crm", "True", "SecretSynced", READY);
    let bob = common::wait_for("bob's grant live", READY, || {
        let stored = ns.stored_refresh_token("crm").ok_or("none")?;
        setup
            .server
            .is_active(&stored)
            .then_some(stored)
            .ok_or("inactive".to_owned())
    });
    assert_ne!(bob, revoked[0]);
}

/// A preset's consent in headless Chromium: the google preset asks for
/// offline access and a fresh consent (without which Google sends no
/// refresh token), against an emulator of Google's documented behaviour.
#[test]
fn a_preset_consent_in_a_real_browser_asks_for_offline_access() {
    let emulator = common::ProviderEmulator::start("google", 6);
    let port = free_port();
    let external = format!("http://127.0.0.1:{port}");
    let ns = TestNamespace::new("preset-consent");
    let bind = format!("127.0.0.1:{port}");
    let _operator = Operator::start_with(
        &ns,
        &[
            "--authorization-bind-address",
            &bind,
            "--external-url",
            &external,
        ],
    );
    ns.create_app_client();
    ns.apply_ok(&format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: analytics\nspec:\n  oauth2:\n    \
         provider: google\n    tokenUrl: \"{token}\"\n    authorizationUrl: \"{authorize}\"\n    revocationUrl: \"{revoke}\"\n    \
         verification:\n      url: \"{me}\"\n    redirectFields: [realmId]\n    grant: authorizationCode\n    \
         client:\n      secretRef:\n        name: app-client\n",
        token = emulator.url("/token"),
        authorize = emulator.url("/authorize"),
        revoke = emulator.url("/revoke"),
        me = emulator.url("/me"),
    ));
    ns.wait_ready("analytics", "False", "AuthorizationRequired", READY);
    let link = wait_for("the authorization link", READY, || {
        let link = ns.jsonpath("srcconn", "analytics", "{.status.authorizationUrl}");
        link.starts_with(&external)
            .then_some(link.clone())
            .ok_or(link)
    });
    // A value sent in the redirect rather than the token answer, as
    // QuickBooks sends realmId.
    emulator.control("redirect-extra", json!({"realmId": "9130357"}));
    let browser = Chromium::start();
    browser.open(&link);
    wait_for("the success page", READY, || {
        let page = browser.source();
        page.contains("<h1>Connected</h1>")
            .then_some(())
            .ok_or(page)
    });
    ns.wait_ready("analytics", "True", "SecretSynced", READY);
    // Kept with the grant: still there after refreshes (6 s tokens).
    let issued = ns.secret_value("analytics-credentials", "access_token");
    wait_for("a refresh", READY, || {
        let now = ns.secret_value("analytics-credentials", "access_token");
        (now != issued).then_some(()).ok_or("not yet".to_owned())
    });
    assert_eq!(
        ns.secret_value("analytics-credentials", "realmId")
            .as_deref(),
        Some("9130357")
    );
    let asked = emulator.stats()["authorizeRequests"][0].clone();
    assert_eq!(asked["access_type"], "offline", "{asked}");
    assert_eq!(asked["prompt"], "consent", "{asked}");
    assert_eq!(asked["scope"], "openid email", "{asked}");
    assert_eq!(asked["code_challenge_method"], "S256", "{asked}");
}

/// A preset whose host is per customer (Salesforce My Domain): the browser
/// goes to the host `providerParams` names, which the browser is told to
/// resolve to the Salesforce emulator (serving HTTPS with a certificate of
/// the test's own), and comes back through the operator's callback.
#[test]
fn a_per_customer_host_preset_consent_in_a_real_browser() {
    let host = "acme.my.salesforce.com";
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", &format!("/CN={host}")])
        .args(["-addext", &format!("subjectAltName=DNS:{host}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let address = common::own_loopback_address();
    let emulator = common::ProviderEmulator::start_with(
        "salesforce",
        6,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-address",
            &format!("{address}:443"),
        ],
    );
    let port = free_port();
    let external = format!("http://127.0.0.1:{port}");
    let ns = TestNamespace::new("preset-host");
    let bind = format!("127.0.0.1:{port}");
    let _operator = Operator::start_with(&ns, &["--authorization-bind-address", &bind]);
    ns.create_app_client();
    ns.apply_ok(&format!(
        "apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: sf\nspec:\n  oauth2:\n    \
         provider: salesforce\n    providerParams:\n      domain: acme.my\n    tokenUrl: \"{token}\"\n    \
         revocationUrl: \"{revoke}\"\n    introspectionUrl: \"{introspect}\"\n    grant: authorizationCode\n    \
         client:\n      secretRef:\n        name: app-client\n",
        token = emulator.url("/services/oauth2/token"),
        revoke = emulator.url("/services/oauth2/revoke"),
        introspect = emulator.url("/services/oauth2/introspect"),
    ));
    ns.wait_ready("sf", "False", "AuthorizationRequired", READY);
    assert_eq!(
        ns.jsonpath(
            "srcconn",
            "sf",
            "{.status.providerEndpoints.authorizationUrl}"
        ),
        format!("https://{host}/services/oauth2/authorize")
    );
    let link = wait_for("the authorization link", READY, || {
        let link = ns.jsonpath("srcconn", "sf", "{.status.authorizationUrl}");
        link.starts_with(&external)
            .then_some(link.clone())
            .ok_or(link)
    });
    let browser = Chromium::start_with(&[
        format!("--host-resolver-rules=MAP {host} {address}"),
        "--ignore-certificate-errors".to_owned(),
    ]);
    browser.open(&link);
    wait_for("the success page", READY, || {
        let page = browser.source();
        page.contains("<h1>Connected</h1>")
            .then_some(())
            .ok_or(page)
    });
    ns.wait_ready("sf", "True", "SecretSynced", READY);
    let asked = emulator.stats()["authorizeRequests"][0].clone();
    assert_eq!(asked["client_id"], "client-1", "{asked}");
    assert_eq!(asked["prompt"], "consent", "{asked}");
    assert_eq!(asked["scope"], "api refresh_token", "{asked}");
    assert_eq!(
        ns.secret_value("sf-credentials", "instance_url").as_deref(),
        Some("https://acme.my.salesforce.com")
    );
}
