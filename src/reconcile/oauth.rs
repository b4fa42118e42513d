//! Reconciling one OAuth 2.0 connection, in phases: read the client, the
//! grant and the target Secret; decide with `decide::grant`; request a
//! token when due and verify it; write the new access token and the
//! (sealed) refresh token to the target Secret in one write; report
//! through `decide::outcome`.
//!
//! One refresh per connection runs at a time: the work queue never
//! reconciles the same connection concurrently. Only the leader writes
//! grants, and it keeps the target Secret it wrote last (see
//! `runtime::secret_cache`), so the refresh token it sends is the one it
//! stored; after a restart or a change by anyone else it reads the Secret
//! from the API again.

use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use tracing::{debug, info, warn};

use crate::api::{OAuth2Auth, OAuth2Grant, SourceConnection};
use crate::decide::classify::{self, FailureContext, VerificationAnswer};
use crate::decide::grant::{
    Action, OAuthInputs, RefreshDecision, TokenAsk, adopt_consented_grant, decide_refresh,
    grant_expiry, jitter_key, next_grant, usable_grant,
};
use crate::decide::outcome::{self, Next, Refreshed, Synced, reauthorize_fix};
use crate::decide::preset::{Resolved, resolve};
use crate::decide::refresh::refresh_due_at;
use crate::decide::secrets::{
    check_ownership, check_source, check_state_ownership, client_credentials, is_own_target,
    renamed_target, secret_key, target_secret, text,
};
use crate::decide::status::{GrantExpiry, Report, TokenStatus, Verdict, display_name};
use crate::decide::validate::{OAuthSettings, oauth_settings};
use crate::error::{Error, Retry};
use crate::oauth::client::{self, Grant, Revocable, TokenRequest};
use crate::oauth::seal::{ANNOTATION_SEALED_GRANT, Binding, SealedGrant};
use crate::oauth::state_secret::{
    GrantState, new_ticket, only_pending, sealed_ticket, store_ticket, ticket_valid,
};
use crate::oauth::token::{IssuedToken, TokenRecord};
use crate::providers::RevocationStyle;
use crate::reconcile::{Context, PendingGrant};
use crate::runtime::object_key::{Key, key_of};
use crate::runtime::throttle::Slot;
use crate::runtime::wire::ReadSecret;
use crate::write::secret::{apply_if_changed, store_state_secret};

/// How often a write of a freshly rotated refresh token is retried before
/// giving up: losing it would lose the grant.
const GRANT_WRITE_ATTEMPTS: u32 = 5;

pub async fn sync(
    conn: &SourceConnection,
    oauth: &OAuth2Auth,
    ctx: &Context,
    now: Timestamp,
) -> Result<Synced, Error> {
    let resolved = resolve(oauth)?;
    let oauth = &resolved.oauth;
    let settings = oauth_settings(oauth, &ctx.limits)?;
    let namespace = conn.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let sync = OAuthSync {
        conn,
        key: key_of(conn),
        jitter_key: jitter_key(conn),
        oauth,
        resolved: &resolved,
        ctx,
        secrets: &secrets,
        settings: &settings,
        now,
    };
    sync.store_pending_grant().await?;
    let mut inputs = sync.read_inputs().await?;
    if let Some(problem) = &inputs.grant_problem {
        warn!(connection = %display_name(conn), %problem, "the sealed refresh token in the target Secret cannot be used");
    }
    let replaced = inputs.grant.clone();
    let adopted = adopt_consented_grant(&mut inputs);
    if !adopted && inputs.inbox.is_some() {
        // An older consent than the grant in use: only in the way, and its
        // refresh token must not be taken for a rotation later.
        sync.clear_inbox(&inputs).await;
        inputs.inbox = None;
    }
    let link = sync.authorization_link(&mut inputs).await?;
    let (mut decision, action) = decide_refresh(conn, oauth, &settings, &inputs, link, now);
    decision.token_status.grant_expiry = inputs.grant.as_ref().and_then(|g| sync.expiry_of(g));
    let mut synced = sync.act(&inputs, decision, action, adopted).await?;
    if adopted {
        sync.after_consent(&inputs, replaced, &mut synced).await;
    }
    Ok(synced)
}

impl OAuthSync<'_> {
    /// Does what `decide_refresh` decided.
    async fn act(
        &self,
        inputs: &OAuthInputs,
        decision: RefreshDecision,
        action: Action,
        adopted: bool,
    ) -> Result<Synced, Error> {
        let conn = self.conn;
        match action {
            Action::AuthorizationRequired(error) => Ok(Synced {
                report: Report {
                    verdict: Some(Verdict::failed(&error)),
                    secret_name: None,
                    token: Some(decision.token_status),
                },
                next: Next::AwaitChange,
                notes: vec![outcome::authorization_required(&error)],
                token_times: None,
            }),
            // Without a request, the target must still hold the newest token
            // and grant: a consent may have just been given.
            Action::RetryAt(until) => {
                if let Some(current) = &inputs.current {
                    self.write_token(inputs, Some(current), inputs.grant.as_ref(), Some(until))
                        .await?;
                }
                self.clear_inbox(inputs).await;
                Ok(Synced::unchanged(Next::At(until)))
            }
            Action::Wait { token, due } => {
                self.write_token(inputs, Some(&token), inputs.grant.as_ref(), Some(due))
                    .await?;
                self.clear_inbox(inputs).await;
                let mut synced = outcome::healthy(
                    conn,
                    self.oauth,
                    self.settings,
                    &token,
                    due,
                    decision.token_status,
                );
                if adopted {
                    synced.notes.push(outcome::token_issued(conn, &token, true));
                }
                Ok(synced)
            }
            Action::Request(ask) => self.refresh_when_api_answers(inputs, &decision, ask).await,
        }
    }

    /// After a consent was adopted: a Normal event names the provider
    /// account it is for, and the grant it replaced is revoked at the
    /// provider (best effort), so that no forgotten grant stays alive.
    async fn after_consent(
        &self,
        inputs: &OAuthInputs,
        replaced: Option<SealedGrant>,
        synced: &mut Synced,
    ) {
        let Some(grant) = &inputs.grant else {
            return;
        };
        let replaced = replaced.filter(|old| old.refresh_token != grant.refresh_token);
        let rfc7009 = self.resolved.revocation_style() == RevocationStyle::Rfc7009;
        let revoked = match (&replaced, &self.oauth.revocation_url) {
            (Some(old), Some(url)) if rfc7009 => {
                let answer = client::revoke(
                    &self.ctx.http,
                    url,
                    &inputs.client_id,
                    &inputs.client_secret,
                    self.oauth.client.auth_method.unwrap_or_default(),
                    Revocable::RefreshToken(&old.refresh_token),
                )
                .await;
                if let Err(failure) = &answer {
                    warn!(connection = %display_name(self.conn), ?failure, "could not revoke the replaced grant");
                }
                Some(answer.is_ok())
            }
            _ => None,
        };
        synced.notes.push(outcome::consent_adopted(
            grant.account.as_deref(),
            replaced.as_ref().map(|old| old.account.as_deref()),
            revoked,
        ));
    }
}

/// How long an authorization link stays valid, and how long before its
/// end the status shows a new one.
const TICKET_LIFETIME: SignedDuration = SignedDuration::from_hours(7 * 24);
const TICKET_RENEWAL: SignedDuration = SignedDuration::from_hours(24);
/// What the link ticket kept in the state Secret is sealed for.
const TICKET_PURPOSE: &str = "authorization-ticket";

/// The state Secret, and the consented grant it holds.
type StateAndInbox = (
    Option<Arc<ReadSecret>>,
    Option<(Arc<ReadSecret>, GrantState)>,
);

/// The ticket of `link` when it is a link to `start`.
fn ticket_of(link: &str, start: &str) -> Option<String> {
    let url = url::Url::parse(link).ok()?;
    let mut without_query = url.clone();
    without_query.set_query(None);
    if without_query.as_str() != start {
        return None;
    }
    url.query_pairs()
        .find(|(name, _)| name == "ticket")
        .map(|(_, value)| value.into_owned())
}

fn link_with(start: &str, ticket: &str) -> String {
    format!("{start}?ticket={ticket}")
}

/// How often a refresh that waits for the Kubernetes API looks again.
const API_WAIT: Duration = Duration::from_secs(2);
/// How soon a refresh whose provider host has its most requests in flight
/// tries again, with its reconcile slot free meanwhile.
const HOST_BUSY_RETRY: Duration = Duration::from_secs(1);

/// What every phase of one OAuth 2.0 reconcile works on.
struct OAuthSync<'a> {
    conn: &'a SourceConnection,
    /// `conn`'s key in the per-connection maps (pending grants, deferrals).
    key: Key,
    /// Spreads this connection's refreshes (`decide::grant::jitter_key`).
    jitter_key: String,
    /// The spec with its preset filled in.
    oauth: &'a OAuth2Auth,
    resolved: &'a Resolved,
    ctx: &'a Context,
    secrets: &'a Api<Secret>,
    settings: &'a OAuthSettings,
    now: Timestamp,
}

impl OAuthSync<'_> {
    /// When `grant` dies whatever is refreshed, if known.
    fn expiry_of(&self, grant: &SealedGrant) -> Option<GrantExpiry> {
        grant_expiry(
            grant,
            self.resolved.absolute_expiry_days(),
            self.ctx.limits.grant_expiry_warning,
        )
    }

    /// The token status after a refresh that wrote `grant`: its expiry as
    /// the new answer tells it (the first refresh of an imported refresh
    /// token may be the first to say when it expires).
    fn status_after(&self, decision: &RefreshDecision, grant: Option<&SealedGrant>) -> TokenStatus {
        let mut status = decision.token_status.clone();
        if let Some(grant) = grant {
            status.grant_expiry = self.expiry_of(grant);
        }
        status
    }

    fn namespace(&self) -> String {
        self.conn.namespace().unwrap_or_default()
    }

    /// Refreshes, unless the Kubernetes API does not answer and the grant
    /// has a refresh token the provider may rotate: then the current token
    /// stays and the refresh waits for the API, which the status says later.
    async fn refresh_when_api_answers(
        &self,
        inputs: &OAuthInputs,
        decision: &RefreshDecision,
        ask: TokenAsk,
    ) -> Result<Synced, Error> {
        let (conn, ctx) = (self.conn, self.ctx);
        if ask.refresh_token.is_some() && !ctx.api.answers(&ctx.client).await {
            info!(connection = %display_name(conn), "the Kubernetes API does not answer; refreshing when it does");
            ctx.api.defer(self.key.clone(), self.now);
            return Ok(Synced::unchanged(Next::In(API_WAIT)));
        }
        let deferred_since = ctx.api.take_deferral(&self.key);
        let mut synced = self.refresh(inputs, decision, ask).await?;
        if let Some(since) = deferred_since {
            outcome::say_deferred(&mut synced, since, self.now);
        }
        Ok(synced)
    }

    /// Requests a token, verifies it, writes it with the grant, and says
    /// what came of it.
    async fn refresh(
        &self,
        inputs: &OAuthInputs,
        decision: &RefreshDecision,
        ask: TokenAsk,
    ) -> Result<Synced, Error> {
        let (conn, oauth) = (self.conn, self.oauth);
        let Some(slot) = self
            .ctx
            .throttle
            .acquire_unless_busy(&oauth.token_url)
            .await
        else {
            debug!(connection = %display_name(conn), "the provider host has its most token requests in flight; trying again shortly");
            return Ok(Synced::unchanged(Next::In(HOST_BUSY_RETRY)));
        };
        debug!(connection = %display_name(conn), reason = ?ask.reason, "requesting a token");
        let sent = std::time::Instant::now();
        let answer = self.request_token(inputs, &ask, slot).await;
        // Not sent (this replica cannot prove it leads): nothing to report
        // on the connection; retried like any Kubernetes trouble.
        if let Err((error @ Error::NotLeading, _)) = answer {
            return Err(error);
        }
        self.count_token_request(&answer, sent.elapsed());
        let issued = match answer {
            Ok(issued) => issued,
            Err((error, rotated)) => {
                if let Some(rotated) = rotated {
                    // The provider may have rotated the refresh token
                    // already: it is kept before anything else is decided.
                    let grant = SealedGrant {
                        refresh_token: rotated,
                        refresh_token_expires_at: None,
                        imported_hash: ask.import_hash.clone(),
                        ..inputs.grant.clone().unwrap_or_default()
                    };
                    let (current, due) = self.current_and_due(inputs);
                    self.write_token(inputs, current, Some(&grant), due).await?;
                }
                return self.after_failure(inputs, decision, &ask, error).await;
            }
        };
        let issued = self.introspected(inputs, issued).await;
        let mut record = self.record_of(inputs, &issued, &decision.request_hash);
        let grant = ask.refresh_token.map(|used| {
            let previous = inputs.grant.as_ref();
            next_grant(previous, &issued, used, ask.import_hash, record.issued_at)
        });
        let rejected = self.verify(&mut record).await;
        let due = self.due_of(&record);
        // The new refresh token and access token go out in one write.
        self.write_token(inputs, Some(&record), grant.as_ref(), Some(due))
            .await?;
        self.clear_inbox(inputs).await;
        if let Some(error) = &rejected {
            warn!(connection = %display_name(conn), reason = %error.reason(), "the access token just issued was refused");
        }
        let refreshed = Refreshed {
            record,
            due,
            reason: ask.reason,
            rejected,
        };
        Ok(outcome::after_refresh(
            conn,
            oauth,
            self.settings,
            refreshed,
            self.status_after(decision, grant.as_ref()),
            self.now,
            &decision.jitter_key,
        ))
    }

    /// The token the target Secret holds and when it is due, for a write
    /// that changes only the grant.
    fn current_and_due<'i>(
        &self,
        inputs: &'i OAuthInputs,
    ) -> (Option<&'i TokenRecord>, Option<Timestamp>) {
        let current = inputs.current.as_ref();
        (current, current.map(|c| self.due_of(c)))
    }

    /// Counts a token request that was sent, by its result, and its latency.
    fn count_token_request<T>(&self, answer: &Result<T, (Error, Option<String>)>, took: Duration) {
        let result = match answer {
            Ok(_) => "success",
            Err((error, _)) => error.reason().as_str(),
        };
        self.ctx
            .metrics
            .token_request(&self.oauth.token_url, result, took);
    }

    /// When `record` is to be replaced.
    fn due_of(&self, record: &TokenRecord) -> Timestamp {
        refresh_due_at(record, &self.settings.schedule, &self.jitter_key)
    }

    /// Sends the token request while holding its slot of the provider
    /// host's throttle. A failed answer comes with the refresh token it carried, if any.
    async fn request_token(
        &self,
        inputs: &OAuthInputs,
        ask: &TokenAsk,
        slot: Slot,
    ) -> Result<IssuedToken, (Error, Option<String>)> {
        let oauth = self.oauth;
        // Right before the request leaves: only a replica that holds the
        // lease may send a refresh token, and only for as long as it holds it.
        let time_left = self.ctx.fence.time_left().map_err(|e| (e, None))?;
        let request = TokenRequest {
            token_url: &oauth.token_url,
            client_id: &inputs.client_id,
            client_secret: &inputs.client_secret,
            auth_method: oauth.client.auth_method.unwrap_or_default(),
            scopes: &oauth.scopes,
            extra_params: &oauth.extra_token_params,
            grant: match &ask.refresh_token {
                Some(token) => Grant::RefreshToken(token),
                None => Grant::ClientCredentials,
            },
            timeout: time_left.min(client::REQUEST_TIMEOUT),
        };
        let answer = client::request_token(&self.ctx.http, request).await;
        drop(slot);
        answer.map_err(|failure| {
            let rotated = failure.rotated_refresh_token().map(str::to_owned);
            let namespace = self.namespace();
            let context = FailureContext {
                now: self.now,
                token_endpoint: &oauth.token_url,
                refresh_token_expires_at: ask.refresh_token_expires_at,
                reauthorize_fix: &reauthorize_fix(self.conn, oauth),
                client_secret_namespace: &namespace,
                client_secret_name: &oauth.client.secret_ref.name,
                max_retry_after: self.settings.max_retry_after,
                dialect: self.resolved.dialect(),
            };
            (classify::classify(&failure, &context), rotated)
        })
    }

    /// The record of a token just issued; without `scope` in the answer it
    /// has the scopes the current token had, or else those requested.
    fn record_of(
        &self,
        inputs: &OAuthInputs,
        issued: &IssuedToken,
        request_hash: &str,
    ) -> TokenRecord {
        let oauth = self.oauth;
        let scope_if_unsaid = inputs
            .current
            .as_ref()
            .and_then(|c| c.scope.clone())
            .or_else(|| (!oauth.scopes.is_empty()).then(|| oauth.scopes.join(" ")));
        TokenRecord::issued(
            self.now,
            issued,
            self.settings.lifetimes(),
            scope_if_unsaid,
            &oauth.response_fields,
            request_hash,
        )
    }

    /// A token answered without `expires_in` gets its real end from the
    /// provider's introspection endpoint, when it has one; otherwise (or
    /// when that fails) the default lifetime applies, as the status says.
    async fn introspected(&self, inputs: &OAuthInputs, mut issued: IssuedToken) -> IssuedToken {
        let Some(url) = self.oauth.introspection_url.as_deref() else {
            return issued;
        };
        if issued.expires_in.is_some() {
            return issued;
        }
        let Some(_slot) = self.ctx.throttle.acquire_unless_busy(url).await else {
            return issued;
        };
        let answer = client::introspect(
            &self.ctx.http,
            url,
            &inputs.client_id,
            &inputs.client_secret,
            self.oauth.client.auth_method.unwrap_or_default(),
            &issued.access_token,
        )
        .await;
        match answer {
            Ok(Some(end)) if end > self.now => {
                let left = end.duration_since(self.now);
                issued.expires_in = Duration::try_from(left).ok();
                issued.oddities.push(
                    "expires_in was absent; the expiry is the introspection endpoint's exp"
                        .to_owned(),
                );
            }
            Ok(_) => {
                warn!(connection = %display_name(self.conn), "the introspection endpoint gave no expiry for the new token");
            }
            Err(failure) => {
                warn!(connection = %display_name(self.conn), ?failure, "the introspection endpoint did not answer; the default lifetime applies");
            }
        }
        issued
    }

    /// Asks the verification URL, when set, whether the provider accepts
    /// the token it just issued. A 403 is kept on the record; a 401 is the
    /// error to report.
    async fn verify(&self, record: &mut TokenRecord) -> Option<Error> {
        let verification = self.oauth.verification.as_ref()?;
        // Through the host's gate like token requests, so that a hanging
        // API cannot hold every reconcile slot either.
        let Some(_slot) = self
            .ctx
            .throttle
            .acquire_unless_busy(&verification.url)
            .await
        else {
            debug!(connection = %display_name(self.conn), "the verification host has its most requests in flight; the token is kept unverified");
            return None;
        };
        let answer = client::verify(&self.ctx.http, &verification.url, &record.access_token).await;
        match answer {
            VerificationAnswer::Accepted => None,
            VerificationAnswer::Forbidden { detail } => {
                record.verification_denied =
                    Some(format!("GET {} answered {detail}", verification.url));
                None
            }
            VerificationAnswer::Unauthorized { detail } => Some(Error::AccessTokenRejected {
                url: verification.url.clone(),
                detail,
            }),
            VerificationAnswer::Inconclusive { detail } => {
                warn!(connection = %display_name(self.conn), %detail, "verification request gave no answer; token kept");
                None
            }
        }
    }

    /// After a failed token request: a grant rotated meanwhile by a sibling
    /// refresh or a new consent is merely stale, not revoked, and is tried
    /// again at once; anything else is reported.
    async fn after_failure(
        &self,
        inputs: &OAuthInputs,
        decision: &RefreshDecision,
        ask: &TokenAsk,
        error: Error,
    ) -> Result<Synced, Error> {
        let rejects_grant = matches!(
            error,
            Error::InvalidGrant { .. } | Error::RefreshTokenExpired { .. }
        );
        if rejects_grant
            && let Some(used) = ask.refresh_token.as_deref()
            && self.rotated_meanwhile(used, &inputs.binding).await?
        {
            info!(connection = %display_name(self.conn), "the refresh token changed meanwhile; retrying with the new one");
            return Ok(Synced::unchanged(Next::In(Duration::from_millis(100))));
        }
        warn!(connection = %display_name(self.conn), reason = %error.reason(), "token request failed");
        Ok(outcome::failed(
            self.conn,
            &error,
            inputs.current.as_ref(),
            decision.token_status.clone(),
            self.now,
            &decision.jitter_key,
        ))
    }

    /// Whether the grant now stored differs from the refresh token `used`.
    async fn rotated_meanwhile(&self, used: &str, binding: &Binding) -> Result<bool, Error> {
        let stored = self
            .ctx
            .read_stored_grant(self.secrets, self.conn, binding)
            .await?;
        Ok([stored.sealed, stored.consented]
            .into_iter()
            .flatten()
            .any(|token| token != used))
    }

    async fn read_inputs(&self) -> Result<OAuthInputs, Error> {
        let (conn, oauth, ctx) = (self.conn, self.oauth, self.ctx);
        let namespace = self.namespace();
        let client = ctx
            .secrets
            .get(self.secrets, &namespace, &oauth.client.secret_ref.name)
            .await?;
        let required = ctx.limits.require_source_label;
        if let Some(client) = &client {
            check_source(conn, client.secret(), "oauth2.client.secretRef", required)?;
        }
        let (client_id, client_secret) =
            client_credentials(oauth, &namespace, client.as_deref().map(ReadSecret::secret))?;
        let user_refresh_token = self.read_user_refresh_token().await?;

        let target = ctx
            .secrets
            .get(self.secrets, &namespace, &conn.target_secret_name())
            .await?;
        check_ownership(conn, target.as_deref().map(ReadSecret::secret))?;
        // A deleted target Secret is written again from what tokenkeeper
        // wrote last, grant included.
        let remembered = match &target {
            Some(_) => None,
            None => ctx
                .secrets
                .last_written(&namespace, &conn.target_secret_name()),
        };
        // A renamed target starts from the Secret the connection wrote
        // before, which is deleted once the new one is written.
        let renamed_from = match (&target, &remembered) {
            (None, None) => self.read_renamed_target().await?,
            _ => None,
        };
        let source = target
            .as_deref()
            .or(remembered.as_deref())
            .or(renamed_from.as_deref());
        let current = source.and_then(|t| {
            TokenRecord::from_target(t.data.as_ref()?, t.annotations(), &oauth.response_fields)
        });
        let uid = conn.uid().unwrap_or_default();
        let binding = Binding::new(&uid, oauth, &client_id);
        let grant_sealing_key = match oauth.grant {
            OAuth2Grant::ClientCredentials => None,
            _ => ctx.keyring.current().public_key(),
        };
        let mut inputs = OAuthInputs {
            binding,
            grant_sealing_key,
            client_id,
            client_secret,
            user_refresh_token,
            target: None,
            stored_grant: None,
            grant: None,
            grant_problem: None,
            inbox: None,
            state: None,
            current,
        };
        if oauth.grant != OAuth2Grant::ClientCredentials {
            let keyring = ctx.keyring.current();
            match source.map(|t| keyring.open_grant(t, &uid)) {
                Some(Ok(Some(opened))) => match usable_grant(opened, &inputs.binding) {
                    Ok(grant) => inputs.grant = Some(grant),
                    Err(problem) => inputs.grant_problem = Some(problem),
                },
                Some(Err(problem)) => inputs.grant_problem = Some(problem.into()),
                Some(Ok(None)) | None => {}
            }
            (inputs.state, inputs.inbox) = self.read_inbox(&inputs.binding).await?;
        }
        inputs.stored_grant = target.as_ref().and(inputs.grant.clone());
        inputs.target = target;
        Ok(inputs)
    }

    /// The target Secret this connection wrote before `spec.target.name`
    /// changed, when it is still there and its own.
    async fn read_renamed_target(&self) -> Result<Option<Arc<ReadSecret>>, Error> {
        let Some(old) = renamed_target(self.conn) else {
            return Ok(None);
        };
        let found = self
            .ctx
            .secrets
            .get(self.secrets, &self.namespace(), &old)
            .await?;
        Ok(found.filter(|s| is_own_target(self.conn, s.secret())))
    }

    /// The refresh token the user supplied (refreshToken grant).
    async fn read_user_refresh_token(&self) -> Result<Option<String>, Error> {
        let oauth = self.oauth;
        let (OAuth2Grant::RefreshToken, Some(reference)) =
            (&oauth.grant, &oauth.refresh_token_secret_ref)
        else {
            return Ok(None);
        };
        let namespace = self.namespace();
        let secret = self
            .ctx
            .secrets
            .get(self.secrets, &namespace, &reference.name)
            .await?
            .ok_or_else(|| Error::SecretNotFound {
                namespace: namespace.clone(),
                name: reference.name.clone(),
                field: "oauth2.refreshTokenSecretRef",
                example_literals: format!("--from-literal={}=REFRESH_TOKEN", reference.key),
            })?;
        let required = self.ctx.limits.require_source_label;
        check_source(self.conn, &secret, "oauth2.refreshTokenSecretRef", required)?;
        let field = "oauth2.refreshTokenSecretRef.key";
        Ok(Some(text(secret_key(&secret, &reference.key, field)?)))
    }

    /// The state Secret, and the consented grant when it holds one sealed
    /// for what `binding` names.
    async fn read_inbox(&self, binding: &Binding) -> Result<StateAndInbox, Error> {
        let conn = self.conn;
        let state = self
            .ctx
            .secrets
            .get(self.secrets, &self.namespace(), &conn.state_secret_name())
            .await?;
        check_state_ownership(conn, state.as_deref().map(ReadSecret::secret))?;
        let keyring = self.ctx.keyring.current();
        let open = |sealed: &str| match keyring.open(sealed, &binding.uid) {
            Ok(opened) => match usable_grant(opened, binding) {
                Ok(grant) => Some(grant),
                Err(problem) => {
                    warn!(connection = %display_name(conn), %problem, "the consent given is not used");
                    None
                }
            },
            Err(problem) => {
                warn!(connection = %display_name(conn), %problem, "the consent given cannot be opened");
                None
            }
        };
        let inbox = state.clone().and_then(|secret| {
            let consented =
                GrantState::from_data(secret.data.as_ref()?, &self.oauth.response_fields, open);
            consented
                .refresh_token
                .is_some()
                .then_some((secret, consented))
        });
        Ok((state, inbox))
    }

    /// The link that starts a consent for this connection. Its ticket is
    /// what lets a browser start: the one the status shows while it is
    /// valid, otherwise a new one, kept hashed in the state Secret.
    async fn authorization_link(&self, inputs: &mut OAuthInputs) -> Result<Option<String>, Error> {
        let (conn, ctx) = (self.conn, self.ctx);
        let Some(base) = ctx.external_url.as_deref() else {
            return Ok(None);
        };
        if self.oauth.authorization_url.is_none() {
            return Ok(None);
        }
        let start = format!("{base}/authorize/{}/{}", self.namespace(), conn.name_any());
        let data = inputs
            .state
            .as_ref()
            .and_then(|s| s.data.clone())
            .unwrap_or_default();
        let shown = conn
            .status
            .as_ref()
            .and_then(|s| s.authorization_url.as_deref());
        // The link the status shows, or else the one given out last (the
        // status read may predate it): a new one would void it.
        let uid = conn.uid().unwrap_or_default();
        let keyring = ctx.keyring.current();
        let given = sealed_ticket(&data).and_then(|t| keyring.open_text(TICKET_PURPOSE, &uid, &t));
        let kept = shown
            .and_then(|link| ticket_of(link, &start))
            .into_iter()
            .chain(given)
            .find(|ticket| ticket_valid(&data, ticket, self.now, TICKET_RENEWAL));
        if let Some(ticket) = kept {
            return Ok(Some(link_with(&start, &ticket)));
        }
        let ticket = new_ticket();
        let mut data = data;
        store_ticket(
            &mut data,
            &ticket,
            &keyring.seal_text(TICKET_PURPOSE, &uid, &ticket),
            self.now.saturating_add(TICKET_LIFETIME).unwrap_or(self.now),
        );
        let existing = inputs.state.as_deref().map(ReadSecret::secret);
        let written = Arc::new(ReadSecret::new(
            store_state_secret(self.secrets, conn, existing, data).await?,
        ));
        ctx.secrets.wrote((*written).clone());
        if let Some((secret, _)) = inputs.inbox.as_mut() {
            *secret = written.clone();
        }
        inputs.state = Some(written);
        Ok(Some(link_with(&start, &ticket)))
    }

    /// After a consent is adopted (or found stale), the state Secret keeps
    /// only a pending authorization, if any. A failure leaves it for next
    /// time.
    async fn clear_inbox(&self, inputs: &OAuthInputs) {
        let Some((secret, _)) = &inputs.inbox else {
            return;
        };
        let data = only_pending(secret.data.as_ref().unwrap_or(&Default::default()));
        match store_state_secret(self.secrets, self.conn, Some(secret.secret()), data).await {
            Ok(written) => self.ctx.secrets.wrote(ReadSecret::new(written)),
            Err(error) => {
                debug!(connection = %display_name(self.conn), %error, "could not clear the adopted consent");
            }
        }
    }

    /// The target Secret for `record` and `grant`. An unchanged grant keeps
    /// its seal, which is different each time it is made, so that an
    /// unchanged token rewrites nothing.
    fn desired_target(
        &self,
        inputs: &OAuthInputs,
        record: Option<&TokenRecord>,
        grant: Option<&SealedGrant>,
        next_refresh_at: Option<Timestamp>,
    ) -> Secret {
        let conn = self.conn;
        let mut annotations = record
            .map(|r| r.target_annotations(next_refresh_at))
            .unwrap_or_default();
        if let Some(grant) = grant {
            // A seal by an older key, or from before seals named their
            // binding, is made anew.
            let keyring = self.ctx.keyring.current();
            let kept_seal = inputs
                .target
                .as_deref()
                .filter(|_| inputs.stored_grant.as_ref() == Some(grant))
                .and_then(|t| t.annotations().get(ANNOTATION_SEALED_GRANT).cloned())
                .filter(|sealed| keyring.is_current(sealed));
            let sealed = kept_seal.unwrap_or_else(|| keyring.seal(grant, &inputs.binding));
            annotations.insert(ANNOTATION_SEALED_GRANT.to_owned(), sealed);
        }
        let mut data = record.map(TokenRecord::target_data).unwrap_or_default();
        // What the provider sent in the consent's redirect, for API calls.
        if let Some(grant) = grant {
            for (name, value) in &grant.redirect_values {
                data.entry(name.clone())
                    .or_insert_with(|| ByteString(value.clone().into_bytes()));
            }
        }
        target_secret(conn, data, annotations)
    }

    /// Stores the grant an earlier reconcile could not write, before
    /// anything else: until it is stored, no token request is sent.
    async fn store_pending_grant(&self) -> Result<(), Error> {
        let (conn, ctx) = (self.conn, self.ctx);
        let uid = conn.uid().unwrap_or_default();
        let Some(pending) = ctx.pending.get(&self.key, &uid) else {
            return Ok(());
        };
        let inputs = self.read_inputs().await?;
        info!(connection = %display_name(conn), "storing a grant an earlier write could not store");
        let record = pending.record.as_ref().or(inputs.current.as_ref());
        self.write_token(&inputs, record, Some(&pending.grant), pending.due)
            .await
    }

    /// Writes the target Secret when it differs from what `record` and
    /// `grant` make (a grant without a token: an empty Secret that keeps
    /// the grant). A freshly rotated refresh token exists nowhere else, so
    /// that write is retried before giving up.
    async fn write_token(
        &self,
        inputs: &OAuthInputs,
        record: Option<&TokenRecord>,
        grant: Option<&SealedGrant>,
        next_refresh_at: Option<Timestamp>,
    ) -> Result<(), Error> {
        let desired = self.desired_target(inputs, record, grant, next_refresh_at);
        let existing = inputs.target.as_deref();
        let ctx = self.ctx;
        let mut attempt = 1;
        loop {
            match apply_if_changed(self.conn, self.secrets, existing, &desired).await {
                Ok(written) => {
                    if let Some(written) = written {
                        ctx.secrets.wrote(written.secret);
                        ctx.api.answered();
                    }
                    ctx.pending.stored(&self.key);
                    return Ok(());
                }
                Err(error)
                    if error.retry() == Retry::Infrastructure && attempt < GRANT_WRITE_ATTEMPTS =>
                {
                    // Other refreshes wait for the API from now on.
                    if error.is_api_unreachable() {
                        ctx.api.failed();
                    }
                    warn!(connection = %display_name(self.conn), attempt, %error, "could not write the target Secret; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    attempt += 1;
                }
                Err(error) => {
                    if error.is_api_unreachable() {
                        ctx.api.failed();
                    }
                    let new_grant = grant.filter(|g| inputs.stored_grant.as_ref() != Some(*g));
                    if let Some(grant) = new_grant {
                        self.keep_grant(inputs, record, grant, next_refresh_at, &error)
                            .await;
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Keeps a new grant whose write failed. The API refused the Secret
    /// (its size, a quota, a policy): the grant alone, with the token the
    /// Secret already holds, may still be accepted. Otherwise, and when
    /// the API did not answer, the grant waits in memory and is written
    /// before any other token request of this connection.
    async fn keep_grant(
        &self,
        inputs: &OAuthInputs,
        record: Option<&TokenRecord>,
        grant: &SealedGrant,
        next_refresh_at: Option<Timestamp>,
        error: &Error,
    ) {
        let conn = self.conn;
        let mut kept = PendingGrant {
            uid: conn.uid().unwrap_or_default(),
            grant: grant.clone(),
            record: record.cloned(),
            due: next_refresh_at,
        };
        if error.retry() != Retry::Infrastructure && record != inputs.current.as_ref() {
            let (current, due) = self.current_and_due(inputs);
            let desired = self.desired_target(inputs, current, Some(grant), due);
            let existing = inputs.target.as_deref();
            match apply_if_changed(conn, self.secrets, existing, &desired).await {
                Ok(written) => {
                    if let Some(written) = written {
                        self.ctx.secrets.wrote(written.secret);
                    }
                    info!(connection = %display_name(conn), "the new refresh token is stored with the previous access token");
                    return;
                }
                Err(_) => {
                    kept.record = current.cloned();
                    kept.due = due;
                }
            }
        }
        warn!(connection = %display_name(conn), %error, "the target Secret could not be written; the new grant is kept in memory and written when the API accepts it");
        self.ctx.pending.keep(self.key.clone(), kept);
    }
}
