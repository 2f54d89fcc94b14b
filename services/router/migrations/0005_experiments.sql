-- A/B experiments (services/router/experiments.py). An experiment applies to requests for one
-- model name and splits them between variants (jsonb: [{"name", "model", "weight"}, ...], the
-- first is the control). Names are never reused: ledger rows carry "<experiment>/<variant>".

CREATE TABLE experiments (
    name        text PRIMARY KEY,
    model       text NOT NULL,
    variants    jsonb NOT NULL CHECK (jsonb_typeof(variants) = 'array' AND jsonb_array_length(variants) >= 2),
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    created_by  text NOT NULL,
    CHECK (active = (ended_at IS NULL))
);
-- At most one active experiment per requested model name.
CREATE UNIQUE INDEX experiments_one_active_per_model ON experiments (model) WHERE active;

-- Thumbs up (1) / down (-1) per request, keyed by the rating key's org as well: feedback counts only
-- when its org is the ledger row's org, so no tenant can rate (or pre-empt rating) another's request.
-- Re-submitting replaces the score (last one wins).
CREATE TABLE experiment_feedback (
    request_id   text NOT NULL,
    org_id       text NOT NULL,
    key_id       text NOT NULL,
    score        smallint NOT NULL CHECK (score IN (1, -1)),
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (request_id, org_id)
);

-- The experiment report reads the ledger rows of its variants; most rows have no variant.
CREATE INDEX usage_ledger_variant ON usage_ledger (variant) WHERE variant <> '';
