-- Service tier per key (issue 7, priority shedding): under overload the router sheds free
-- traffic first, then pro; enterprise is shed last. Existing keys become pro.
ALTER TABLE api_keys ADD COLUMN tier text NOT NULL DEFAULT 'pro'
    CHECK (tier IN ('free', 'pro', 'enterprise'));
