"""Every input limit of the router's RouterService and AdminService, in one place.

Why: a value PostgreSQL cannot store (a NUL byte, JSONB refuses ``\\u0000`` too; a number past its
column type) or that makes no sense (NaN, a date past year 9999) must be refused when the request
arrives, as INVALID_ARGUMENT naming the field, before a reservation is made; found later, the usage
row is refused by the ledger and dead-lettered (money lost silently), or the call fails with INTERNAL.
The proto field comments (protos/tollgate/router/v1/*.proto) and services/router/README.md repeat
these numbers; change them together.
"""

from __future__ import annotations

# Messages and sampling parameters: the limits every service shares (libs/chat.py), re-exported here.
from libs.chat import MAX_MESSAGE_NAME_CHARS as MAX_MESSAGE_NAME_CHARS
from libs.chat import MAX_MESSAGES as MAX_MESSAGES
from libs.chat import MAX_MESSAGES_CHARS as MAX_MESSAGES_CHARS
from libs.chat import MAX_OUTPUT_TOKENS as MAX_OUTPUT_TOKENS
from libs.chat import MAX_PRICE_NANO_USD_PER_MTOK as MAX_PRICE_NANO_USD_PER_MTOK
from libs.chat import MAX_STOP_CHARS as MAX_STOP_CHARS
from libs.chat import MAX_STOP_SEQUENCES as MAX_STOP_SEQUENCES
from libs.validation import MAX_LABEL_KEY_CHARS, MAX_LABEL_VALUE_CHARS, MAX_LABELS

# --- RouterService ---------------------------------------------------------------------------
MAX_MODEL_NAME_CHARS = 128  # model, fallback_models[], allowed_models[], experiment models
MAX_FALLBACK_MODELS = 4
MAX_USER_ID_CHARS = 256
MAX_PROMPT_VERSION_CHARS = 128
ROUTER_MAX_LABELS = MAX_LABELS  # 32
ROUTER_MAX_LABEL_KEY_CHARS = MAX_LABEL_KEY_CHARS  # 64
ROUTER_MAX_LABEL_VALUE_CHARS = MAX_LABEL_VALUE_CHARS  # 256
MAX_CACHE_AGE_S = 30 * 86_400
MAX_RETRIEVAL_TOP_K = 100
MAX_CONTEXT_TOKENS = 32_768
MAX_REQUEST_ID_CHARS = 128  # SubmitFeedback.request_id

# --- AdminService ----------------------------------------------------------------------------
MAX_ID_CHARS = 128  # org_id, team_id, key_id, scope_id
MAX_DISPLAY_NAME_CHARS = 200  # org, team and key names
MAX_ALLOWED_MODELS = 64
MAX_PROVIDER_CHARS = 64
MAX_TARGET_CHARS = 1024  # RegisterModel inference_target (comma-separated host:port list)
MAX_CONTEXT_WINDOW = 2**31 - 1  # PostgreSQL integer
MAX_LIMIT_VALUE = 2**63 - 1  # SetLimits values (PostgreSQL bigint)
# Prices (MAX_PRICE_NANO_USD_PER_MTOK, from libs/chat.py): no request's cost can overflow the ledger's
# bigint (1.1 M tokens x 10^15 nano-USD / 10^6 is ~10^15, far below 9.2 x 10^18).
MAX_BUDGET_NANO_USD = 2**63 - 1
MAX_AUDIT_TARGET_CHARS = 256
MAX_AUDIT_ACTION_CHARS = 64
MAX_AUDIT_EVENTS = 1000
MAX_EXPERIMENT_NAME_CHARS = 64
MAX_VARIANT_NAME_CHARS = 32
MAX_VARIANTS = 10
