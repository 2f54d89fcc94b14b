-- Control plane and usage ledger. PostgreSQL is the source of truth for keys,
-- limits, budgets, models and prices; the ratelimit service reads limits and
-- budgets from here.

CREATE TABLE orgs (
    org_id      text PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE teams (
    team_id     text PRIMARY KEY,
    org_id      text NOT NULL REFERENCES orgs (org_id),
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

-- Virtual keys: only a SHA-256 of the secret is stored (keys are 256-bit random,
-- so a fast unsalted hash is enough; see services/router/keys.py).
CREATE TABLE api_keys (
    key_id          text PRIMARY KEY,
    key_hash        bytea NOT NULL UNIQUE,
    display_prefix  text NOT NULL,
    org_id          text NOT NULL REFERENCES orgs (org_id),
    team_id         text NOT NULL REFERENCES teams (team_id),
    name            text NOT NULL,
    role            text NOT NULL CHECK (role IN ('admin', 'member')),
    allowed_models  text[] NOT NULL DEFAULT '{}',
    expires_at      timestamptz,
    revoked_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Zero means unlimited.
CREATE TABLE limits (
    scope                text NOT NULL CHECK (scope IN ('global', 'org', 'team', 'key', 'client_ip')),
    scope_id             text NOT NULL,
    requests_per_minute  bigint NOT NULL DEFAULT 0 CHECK (requests_per_minute >= 0),
    tokens_per_minute    bigint NOT NULL DEFAULT 0 CHECK (tokens_per_minute >= 0),
    tokens_per_day       bigint NOT NULL DEFAULT 0 CHECK (tokens_per_day >= 0),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, scope_id)
);

CREATE TABLE budgets (
    scope             text NOT NULL CHECK (scope IN ('global', 'org', 'team', 'key')),
    scope_id          text NOT NULL,
    daily_nano_usd    bigint NOT NULL DEFAULT 0 CHECK (daily_nano_usd >= 0),
    monthly_nano_usd  bigint NOT NULL DEFAULT 0 CHECK (monthly_nano_usd >= 0),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, scope_id)
);

CREATE TABLE models (
    name              text PRIMARY KEY,
    provider          text NOT NULL,
    inference_target  text NOT NULL,
    context_window    integer NOT NULL CHECK (context_window > 0),
    cost_tier         text NOT NULL CHECK (cost_tier IN ('cheap', 'strong')),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- Append-only: a price change adds a version; history keeps the version it was billed at.
CREATE TABLE prices (
    price_version                   bigserial PRIMARY KEY,
    model                           text NOT NULL REFERENCES models (name),
    input_nano_usd_per_mtok         bigint NOT NULL CHECK (input_nano_usd_per_mtok >= 0),
    output_nano_usd_per_mtok        bigint NOT NULL CHECK (output_nano_usd_per_mtok >= 0),
    cached_input_nano_usd_per_mtok  bigint NOT NULL CHECK (cached_input_nano_usd_per_mtok >= 0),
    effective_from                  timestamptz NOT NULL,
    created_at                      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (model, effective_from)
);

-- One row per request, written by the ledger writer from the usage stream; request_id makes it idempotent.
CREATE TABLE usage_ledger (
    request_id           text PRIMARY KEY,
    started_at           timestamptz NOT NULL,
    finished_at          timestamptz NOT NULL,
    org_id               text NOT NULL,
    team_id              text NOT NULL,
    key_id               text NOT NULL,
    model                text NOT NULL,
    provider             text NOT NULL,
    input_tokens         integer NOT NULL,
    output_tokens        integer NOT NULL,
    cached_input_tokens  integer NOT NULL,
    cost_nano_usd        bigint NOT NULL,
    saved_nano_usd       bigint NOT NULL,
    price_version        bigint,
    cache_tier           text NOT NULL,
    status               text NOT NULL,
    error_reason         text NOT NULL DEFAULT '',
    latency_ms           integer NOT NULL,
    degraded             boolean NOT NULL DEFAULT false,
    variant              text NOT NULL DEFAULT '',
    labels               jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX usage_ledger_started_at ON usage_ledger (started_at);
CREATE INDEX usage_ledger_org_started_at ON usage_ledger (org_id, started_at);

CREATE TABLE audit_log (
    id            bigserial PRIMARY KEY,
    actor_key_id  text NOT NULL,
    action        text NOT NULL,
    target        text NOT NULL,
    before        jsonb,
    after         jsonb,
    at            timestamptz NOT NULL DEFAULT now()
);
