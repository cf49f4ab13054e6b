"""One typed settings object, read once from the environment and `.env`."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from environs import Env

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Words that escalate a message at once (whole words, any case): a visitor asking for a person, and words too serious
# for the AI to handle alone. Ordinary support words ("refund", "return", "complaint", "urgent") are not here: the
# knowledge base answers them, and a visitor who is upset is offered a person by the sentiment trigger instead.
PERSON_KEYWORDS = (
    "human",
    "agent",
    "real person",
    "speak to a person",
    "talk to a person",
    "representative",
    "speak to someone",
    "talk to someone",
    "manager",
    "supervisor",
)
SEVERE_KEYWORDS = (
    "lawyer",
    "attorney",
    "legal action",
    "lawsuit",
    "fraud",
    "scam",
    "chargeback",
    "police",
    "stolen card",
    "identity theft",
)
DEFAULT_KEYWORDS = PERSON_KEYWORDS + SEVERE_KEYWORDS


class Secret:
    """A value that must never show up in logs, reprs or health answers."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value or None

    def reveal(self) -> str | None:
        """The raw value, for the one place that must send it (an SDK client)."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret(None)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest((self._value or "").encode(), (other._value or "").encode())

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class StreamingSettings:
    """How a reply's deltas are coalesced into `message-chunk` events (STREAM_FLUSH_MS, STREAM_FLUSH_CHARS)."""

    flush_ms: int = 40
    flush_chars: int = 64


@dataclass(frozen=True, slots=True)
class ChatSettings:
    """What the chat service reads of the settings: context, queue bound, ordering, logging, streaming."""

    max_history: int = 10  # earlier messages sent with each prompt (MAX_CONVERSATION_HISTORY)
    max_pending_per_session: int = 20  # messages waiting per session (0: no limit)
    cross_process_order: bool = False  # session order (a Redis lock) and in-flight snapshots across processes
    log_content: bool = True  # prompts in debug logs (LOG_MESSAGE_CONTENT)
    token_rotate_after: float | None = None  # idle seconds after which a rejoin hands out a new token
    lease_seconds: float = 5.0  # how long a reply's owner may go silent before another process finishes it
    messages_per_minute: int = 0  # per session, counted as each message is stored (RATE_LIMIT_MESSAGES_PER_MINUTE)
    streaming: StreamingSettings = field(default_factory=StreamingSettings)


@dataclass(frozen=True, slots=True)
class HandoffSettings:
    """The handoff to people: what the visitor is told, and how long a wait or an agent's silence may last."""

    message: str
    wait_timeout: float  # seconds in the queue before a ticket (AGENT_WAIT_TIMEOUT)
    idle_timeout: float  # seconds of agent silence before the AI is back (AGENT_IDLE_TIMEOUT)


@dataclass(frozen=True, slots=True)
class FailoverSettings:
    """When the provider chain gives up on a provider: its breaker, and how long an answer may keep us waiting."""

    failure_threshold: int = 3  # failures in a row that open a provider's circuit (PROVIDER_FAILURE_THRESHOLD)
    cooldown: float = 30.0  # seconds an open circuit skips the provider (PROVIDER_COOLDOWN)
    request_timeout: float = 30.0  # seconds for a whole provider call (AI_REQUEST_TIMEOUT)
    first_token_timeout: float = 10.0  # seconds to the first token before failing over (AI_FIRST_TOKEN_TIMEOUT)
    idle_timeout: float = 15.0  # seconds of silence mid-answer before it is cut (AI_STREAM_IDLE_TIMEOUT)


@dataclass(frozen=True, slots=True)
class EscalationSettings:
    """When a conversation needs a person: keywords, misses in a row, and how upset a visitor may read."""

    keywords: tuple[str, ...] = DEFAULT_KEYWORDS
    confidence_threshold: float = 0.5  # an in-scope reply below it is a miss (ESCALATION_CONFIDENCE_THRESHOLD)
    misses_in_a_row: int = 2  # misses in a row that escalate (ESCALATION_MISSES_IN_A_ROW; 1: every miss)
    sentiment_threshold: float = -0.8  # SENTIMENT_THRESHOLD (-1: the at-once rule is off)
    negative_threshold: float = -0.5  # SENTIMENT_NEGATIVE_THRESHOLD
    negatives_in_a_row: int = 3  # SENTIMENT_NEGATIVES_IN_A_ROW (0: off)
    model_threshold: float = 0.8  # SENTIMENT_MODEL_THRESHOLD: a model's upset score (0..1) at or above it escalates


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the server; defaults are the contract's."""

    host: str = "0.0.0.0"
    port: int = 3000
    openai_api_key: Secret = field(default_factory=lambda: Secret(None))
    openai_model: str = "gpt-4.1-mini"
    openai_base_url: str | None = None
    gemini_api_key: Secret = field(default_factory=lambda: Secret(None))
    gemini_model: str = "gemini-2.5-flash"
    gemini_base_url: str | None = None
    openai_client: str = "direct"  # the OpenAI provider's transport: `direct` (HTTP spoken here) or `sdk` (OPENAI_CLIENT)
    gemini_client: str = "direct"  # the Gemini provider's transport: `direct` or `sdk` (GEMINI_CLIENT)
    ai_providers: tuple[str, ...] = ("openai", "gemini", "local")
    ai_request_timeout: float = 30.0
    ai_first_token_timeout: float = 10.0
    ai_stream_idle_timeout: float = 15.0
    provider_failure_threshold: int = 3
    provider_cooldown: float = 30.0
    redis_url: str | None = None
    data_dir: Path = PROJECT_ROOT / "data"
    max_conversation_history: int = 10
    max_message_length: int = 4000
    escalation_keywords: tuple[str, ...] = DEFAULT_KEYWORDS
    escalation_confidence_threshold: float = 0.5
    # In-scope replies below the threshold in a row before `low_confidence` escalates (1: at the first one)
    escalation_misses_in_a_row: int = 2
    # The sentiment trigger, on VADER's compound score (-1..1) of each visitor message: at or below the threshold a
    # person is offered at once (-1: never), as for a message with words of anger or insult that is not positive
    sentiment_threshold: float = -0.8
    sentiment_negative_threshold: float = -0.5  # at or below this (or angry words) a message counts as negative
    sentiment_negatives_in_a_row: int = 3  # negative messages in a row that escalate too (0: never)
    # `lexicon` (VADER, offline) or `provider`: with an OpenAI key, OPENAI_MODEL also scores each message 0..1 (upset),
    # within SENTIMENT_MODEL_TIMEOUT seconds; at or above SENTIMENT_MODEL_THRESHOLD it escalates at once
    sentiment_model: str = "lexicon"
    sentiment_model_timeout: float = 2.0
    sentiment_model_threshold: float = 0.8
    # Languages the visitor's messages are told apart in (ISO 639-1; empty: no detection), and how sure it must be
    languages: tuple[str, ...] = ("en", "es", "de", "fr", "it", "pt", "nl")
    language_min_confidence: float = 0.6
    language_min_margin: float = 0.35  # ... or how far ahead of the second language it must be
    language_accuracy: str = "high"  # lingua's mode: `high` (~28 MB of models per language) or `low` (fast, small, unsure)
    session_timeout_ms: int = 1_800_000
    log_level: str = "INFO"
    log_format: str = "text"
    cors_origins: tuple[str, ...] = ()
    csp_connect_src: tuple[str, ...] = ()  # origins the pages may connect to besides their own (CSP connect-src)
    stream_flush_ms: int = 40
    stream_flush_chars: int = 64
    store_name: str = "Northwind Goods"
    assistant_tone: str = "warm, concise and professional"
    system_prompt_file: Path = PROJECT_ROOT / "config" / "system_prompt.md"
    knowledge_dir: Path = PROJECT_ROOT / "config" / "knowledge"
    knowledge_in_prompt: int = 3
    # Dense embeddings of the knowledge base: `wordllama` (offline, shipped in its wheel; what config/calibration.json
    # was fitted on) or `openai` (text-embedding-3-small, needs OPENAI_API_KEY; the offline model stays the fallback)
    embeddings: str = "wordllama"
    openai_embedding_model: str = "text-embedding-3-small"
    embeddings_timeout: float = 1.0  # seconds for a question's remote embedding before the offline one is used
    calibration_file: Path = PROJECT_ROOT / "config" / "calibration.json"
    ws_compression: bool = False
    max_body_bytes: int = 64 * 1024
    socket_max_packet_bytes: int = 1_000_000
    socket_connect_timeout: float = 45.0
    request_read_timeout: float = 30.0
    http_keepalive_timeout: float = 75.0
    metadata_max_bytes: int = 4096
    agent_api_keys: tuple[tuple[str, Secret], ...] = ()
    agent_auth_failures_per_minute: int = 10
    agent_auth_lockout: float = 300.0
    agent_auth_global_failures_per_minute: int = 100
    handoff_message: str = (
        "I'm bringing in a member of our support team. They'll see everything we've discussed, "
        "so you won't need to repeat yourself. You can keep writing meanwhile."
    )
    agent_wait_timeout: float = 120.0
    agent_idle_timeout: float = 300.0
    shutdown_grace: float = 20.0
    socketio_manager: str = "auto"
    workers: int = 1  # server processes on one port (WORKERS=auto|N); above 1, a supervisor runs them
    # Set in the workers only (never from the environment): redis_url is the embedded Redis their supervisor started.
    redis_embedded_shared: bool = False
    rate_limit_sessions_per_minute: int = 300
    rate_limit_messages_per_minute: int = 600
    rate_limit_connections_per_minute: int = 1000
    rate_limit_events_per_minute: int = 30
    max_pending_per_session: int = 20
    max_pending_per_client: int = 50
    max_history_per_session: int = 2000
    tickets_per_client_per_hour: int = 5
    trusted_proxies: tuple[str, ...] = ()
    # Seconds idle after which a rejoin or REST call gets a new token; None: half of SESSION_TIMEOUT.
    token_rotate_after: float | None = None
    # Seconds a just-rotated token is refused without revoking its session's tokens (a client's own requests in flight).
    token_reuse_grace: float = 5.0
    log_message_content: bool = True
    token_budget_per_session: int = 200_000
    token_budget_per_day: int = 5_000_000
    token_budget_per_visitor: int = 250_000
    token_budget_per_ip: int = 1_000_000
    token_budget_degrade_at: float = 0.8
    max_prompt_tokens: int = 3000
    write_behind_capacity: int = 10_000
    metrics_token: Secret = field(default_factory=lambda: Secret(None))

    @property
    def session_ttl_seconds(self) -> int:
        """Redis TTLs are whole seconds; the contract's setting is milliseconds."""
        return max(1, -(-self.session_timeout_ms // 1000))

    @property
    def scaled_out(self) -> bool:
        """Whether Socket.IO rooms and session order must hold across processes (external Redis, unless told not)."""
        if self.socketio_manager == "memory":
            return False
        return self.redis_url is not None

    @property
    def streaming(self) -> StreamingSettings:
        """Chunk coalescing, for the reply streams."""
        return StreamingSettings(flush_ms=self.stream_flush_ms, flush_chars=self.stream_flush_chars)

    @property
    def chat(self) -> ChatSettings:
        """The chat service's settings."""
        return ChatSettings(
            max_history=self.max_conversation_history,
            max_pending_per_session=self.max_pending_per_session,
            cross_process_order=self.scaled_out,
            log_content=self.log_message_content,
            token_rotate_after=self.token_rotate_after,
            messages_per_minute=self.rate_limit_messages_per_minute,
            streaming=self.streaming,
        )

    @property
    def escalation(self) -> EscalationSettings:
        """The escalation rules' settings."""
        return EscalationSettings(
            keywords=self.escalation_keywords,
            confidence_threshold=self.escalation_confidence_threshold,
            misses_in_a_row=max(1, self.escalation_misses_in_a_row),
            sentiment_threshold=self.sentiment_threshold,
            negative_threshold=self.sentiment_negative_threshold,
            negatives_in_a_row=max(0, self.sentiment_negatives_in_a_row),
            model_threshold=self.sentiment_model_threshold,
        )

    @property
    def failover(self) -> FailoverSettings:
        """The provider chain's breakers and watchdog."""
        return FailoverSettings(
            failure_threshold=self.provider_failure_threshold,
            cooldown=self.provider_cooldown,
            request_timeout=self.ai_request_timeout,
            first_token_timeout=self.ai_first_token_timeout,
            idle_timeout=self.ai_stream_idle_timeout,
        )

    @property
    def handoff(self) -> HandoffSettings:
        """The handoff service's settings."""
        return HandoffSettings(
            message=self.handoff_message, wait_timeout=self.agent_wait_timeout, idle_timeout=self.agent_idle_timeout
        )

    @property
    def redis_mode(self) -> str:
        """`external` when an operator pointed us at a Redis, else `embedded`."""
        return "external" if self.redis_url and not self.redis_embedded_shared else "embedded"

    @classmethod
    def from_env(cls, env_file: str | Path | None = ".env") -> Settings:
        """Read the environment (and `.env` when present) once, at start-up."""
        env = Env()
        if env_file is not None:
            env.read_env(str(env_file), recurse=False, override=False)
        defaults = cls()
        redis_url = env.str("REDIS_URL", None) or _redis_url_from_parts(env)
        providers = tuple(p.strip().lower() for p in env.list("AI_PROVIDERS", list(defaults.ai_providers)) if p.strip())
        keywords = tuple(
            k.strip().lower() for k in env.list("ESCALATION_KEYWORDS", list(defaults.escalation_keywords)) if k.strip()
        )
        return cls(
            host=env.str("HOST", defaults.host),
            port=env.int("PORT", defaults.port),
            openai_api_key=Secret(env.str("OPENAI_API_KEY", None)),
            openai_model=env.str("OPENAI_MODEL", defaults.openai_model),
            openai_base_url=env.str("OPENAI_BASE_URL", None) or None,
            gemini_api_key=Secret(env.str("GEMINI_API_KEY", None)),
            gemini_model=env.str("GEMINI_MODEL", defaults.gemini_model),
            gemini_base_url=env.str("GEMINI_BASE_URL", None) or None,
            openai_client=env.str("OPENAI_CLIENT", defaults.openai_client).strip().lower(),
            gemini_client=env.str("GEMINI_CLIENT", defaults.gemini_client).strip().lower(),
            ai_providers=providers,
            ai_request_timeout=env.float("AI_REQUEST_TIMEOUT", defaults.ai_request_timeout),
            ai_first_token_timeout=env.float("AI_FIRST_TOKEN_TIMEOUT", defaults.ai_first_token_timeout),
            ai_stream_idle_timeout=env.float("AI_STREAM_IDLE_TIMEOUT", defaults.ai_stream_idle_timeout),
            provider_failure_threshold=env.int("PROVIDER_FAILURE_THRESHOLD", defaults.provider_failure_threshold),
            provider_cooldown=env.float("PROVIDER_COOLDOWN", defaults.provider_cooldown),
            redis_url=redis_url,
            data_dir=Path(env.str("DATA_DIR", str(defaults.data_dir))),
            max_conversation_history=env.int("MAX_CONVERSATION_HISTORY", defaults.max_conversation_history),
            max_message_length=env.int("MAX_MESSAGE_LENGTH", defaults.max_message_length),
            escalation_keywords=keywords,
            escalation_confidence_threshold=env.float(
                "ESCALATION_CONFIDENCE_THRESHOLD", defaults.escalation_confidence_threshold
            ),
            escalation_misses_in_a_row=env.int("ESCALATION_MISSES_IN_A_ROW", defaults.escalation_misses_in_a_row),
            sentiment_threshold=env.float("SENTIMENT_THRESHOLD", defaults.sentiment_threshold),
            sentiment_negative_threshold=env.float("SENTIMENT_NEGATIVE_THRESHOLD", defaults.sentiment_negative_threshold),
            sentiment_negatives_in_a_row=env.int("SENTIMENT_NEGATIVES_IN_A_ROW", defaults.sentiment_negatives_in_a_row),
            sentiment_model=env.str("SENTIMENT_MODEL", defaults.sentiment_model).strip().lower(),
            sentiment_model_timeout=env.float("SENTIMENT_MODEL_TIMEOUT", defaults.sentiment_model_timeout),
            sentiment_model_threshold=env.float("SENTIMENT_MODEL_THRESHOLD", defaults.sentiment_model_threshold),
            languages=tuple(c.strip().lower() for c in env.list("LANGUAGES", list(defaults.languages)) if c.strip()),
            language_min_confidence=env.float("LANGUAGE_MIN_CONFIDENCE", defaults.language_min_confidence),
            language_min_margin=env.float("LANGUAGE_MIN_MARGIN", defaults.language_min_margin),
            language_accuracy=env.str("LANGUAGE_ACCURACY", defaults.language_accuracy).strip().lower(),
            session_timeout_ms=env.int("SESSION_TIMEOUT", defaults.session_timeout_ms),
            log_level=env.str("LOG_LEVEL", defaults.log_level).upper(),
            log_format=env.str("LOG_FORMAT", defaults.log_format).lower(),
            cors_origins=_stripped(env.list("CORS_ORIGINS", [])),
            csp_connect_src=_stripped(env.list("CSP_CONNECT_SRC", [])),
            stream_flush_ms=env.int("STREAM_FLUSH_MS", defaults.stream_flush_ms),
            stream_flush_chars=env.int("STREAM_FLUSH_CHARS", defaults.stream_flush_chars),
            store_name=env.str("STORE_NAME", defaults.store_name),
            assistant_tone=env.str("ASSISTANT_TONE", defaults.assistant_tone),
            system_prompt_file=Path(env.str("SYSTEM_PROMPT_FILE", str(defaults.system_prompt_file))),
            knowledge_dir=Path(env.str("KNOWLEDGE_DIR", str(defaults.knowledge_dir))),
            knowledge_in_prompt=env.int("KNOWLEDGE_IN_PROMPT", defaults.knowledge_in_prompt),
            embeddings=env.str("EMBEDDINGS", defaults.embeddings).strip().lower(),
            openai_embedding_model=env.str("OPENAI_EMBEDDING_MODEL", defaults.openai_embedding_model),
            embeddings_timeout=env.float("EMBEDDINGS_TIMEOUT", defaults.embeddings_timeout),
            calibration_file=Path(env.str("CALIBRATION_FILE", str(defaults.calibration_file))),
            ws_compression=env.bool("WS_COMPRESSION", defaults.ws_compression),
            socket_max_packet_bytes=env.int("SOCKET_MAX_PACKET_BYTES", defaults.socket_max_packet_bytes),
            socket_connect_timeout=env.float("SOCKET_CONNECT_TIMEOUT", defaults.socket_connect_timeout),
            request_read_timeout=env.float("REQUEST_READ_TIMEOUT", defaults.request_read_timeout),
            http_keepalive_timeout=env.float("HTTP_KEEPALIVE_TIMEOUT", defaults.http_keepalive_timeout),
            agent_api_keys=parse_agent_keys(env.str("AGENT_API_KEYS", "")),
            agent_auth_failures_per_minute=env.int("AGENT_AUTH_FAILURES_PER_MINUTE", defaults.agent_auth_failures_per_minute),
            agent_auth_lockout=env.float("AGENT_AUTH_LOCKOUT", defaults.agent_auth_lockout),
            agent_auth_global_failures_per_minute=env.int(
                "AGENT_AUTH_GLOBAL_FAILURES_PER_MINUTE", defaults.agent_auth_global_failures_per_minute
            ),
            handoff_message=env.str("HANDOFF_MESSAGE", defaults.handoff_message),
            agent_wait_timeout=env.float("AGENT_WAIT_TIMEOUT", defaults.agent_wait_timeout),
            agent_idle_timeout=env.float("AGENT_IDLE_TIMEOUT", defaults.agent_idle_timeout),
            shutdown_grace=env.float("SHUTDOWN_GRACE", defaults.shutdown_grace),
            socketio_manager=env.str("SOCKETIO_MANAGER", defaults.socketio_manager).lower(),
            workers=parse_workers(env.str("WORKERS", str(defaults.workers))),
            rate_limit_sessions_per_minute=env.int("RATE_LIMIT_SESSIONS_PER_MINUTE", defaults.rate_limit_sessions_per_minute),
            rate_limit_messages_per_minute=env.int("RATE_LIMIT_MESSAGES_PER_MINUTE", defaults.rate_limit_messages_per_minute),
            rate_limit_connections_per_minute=env.int(
                "RATE_LIMIT_CONNECTIONS_PER_MINUTE", defaults.rate_limit_connections_per_minute
            ),
            rate_limit_events_per_minute=env.int("RATE_LIMIT_EVENTS_PER_MINUTE", defaults.rate_limit_events_per_minute),
            max_pending_per_session=env.int("MAX_PENDING_PER_SESSION", defaults.max_pending_per_session),
            max_pending_per_client=env.int("MAX_PENDING_PER_CLIENT", defaults.max_pending_per_client),
            max_history_per_session=env.int("MAX_HISTORY_PER_SESSION", defaults.max_history_per_session),
            tickets_per_client_per_hour=env.int("TICKETS_PER_CLIENT_PER_HOUR", defaults.tickets_per_client_per_hour),
            trusted_proxies=_stripped(env.list("TRUSTED_PROXIES", [])),
            token_rotate_after=env.float("TOKEN_ROTATE_AFTER", defaults.token_rotate_after),
            token_reuse_grace=env.float("TOKEN_REUSE_GRACE", defaults.token_reuse_grace),
            log_message_content=env.bool("LOG_MESSAGE_CONTENT", defaults.log_message_content),
            token_budget_per_session=env.int("TOKEN_BUDGET_PER_SESSION", defaults.token_budget_per_session),
            token_budget_per_day=env.int("TOKEN_BUDGET_PER_DAY", defaults.token_budget_per_day),
            token_budget_per_visitor=env.int("TOKEN_BUDGET_PER_VISITOR", defaults.token_budget_per_visitor),
            token_budget_per_ip=env.int("TOKEN_BUDGET_PER_IP", defaults.token_budget_per_ip),
            token_budget_degrade_at=env.float("TOKEN_BUDGET_DEGRADE_AT", defaults.token_budget_degrade_at),
            max_prompt_tokens=env.int("MAX_PROMPT_TOKENS", defaults.max_prompt_tokens),
            write_behind_capacity=env.int("WRITE_BEHIND_CAPACITY", defaults.write_behind_capacity),
            metrics_token=Secret(env.str("METRICS_TOKEN", None)),
        )


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def parse_workers(raw: str) -> int:
    """WORKERS: `auto` is one process per available CPU, else a whole number from 1 up (empty: 1)."""
    value = raw.strip().lower()
    if not value:
        return 1
    if value == "auto":
        return available_cpus()
    try:
        workers = int(value)
    except ValueError:
        raise ValueError(f"WORKERS must be `auto` or a whole number, not {raw!r}") from None
    if workers < 1:
        raise ValueError(f"WORKERS must be at least 1, not {workers}")
    return workers


def parse_agent_keys(raw: str) -> tuple[tuple[str, Secret], ...]:
    """`name:key,name:key` from AGENT_API_KEYS; entries without both parts are ignored, weak keys refused."""
    pairs: list[tuple[str, Secret]] = []
    for item in raw.split(","):
        name, _, key = item.strip().partition(":")
        if name.strip() and key.strip():
            pairs.append((name.strip(), Secret(key.strip())))
    check_agent_keys(tuple(pairs))
    return tuple(pairs)


class WeakAgentKeyError(ValueError):
    """An agent key that could be guessed: the server refuses to start with it."""


AGENT_KEY_MIN_LENGTH = 16
AGENT_KEY_MIN_DISTINCT = 8
# Fragments that make a key predictable however long it is (checked case-insensitively).
_WEAK_FRAGMENTS = ("password", "changeme", "letmein", "qwerty", "123456", "abcdef", "secret", "example")


def weak_key_reason(key: str) -> str | None:
    """Why a key is too weak to guard the agent API, or None: length, variety, repetition, known fragments."""
    if len(key) < AGENT_KEY_MIN_LENGTH:
        return f"it has {len(key)} characters; at least {AGENT_KEY_MIN_LENGTH} are required"
    classes = sum(
        (
            any(c.islower() for c in key),
            any(c.isupper() for c in key),
            any(c.isdigit() for c in key),
            any(not c.isalnum() for c in key),
        )
    )
    if classes < 2:
        return "it uses only one kind of character (mix letters with digits or symbols)"
    if len(set(key)) < AGENT_KEY_MIN_DISTINCT:
        return f"it repeats a few characters (at least {AGENT_KEY_MIN_DISTINCT} different ones are required)"
    lowered = key.lower()
    for fragment in _WEAK_FRAGMENTS:
        if fragment in lowered:
            return f"it contains the guessable word {fragment!r}"
    return None


def check_agent_keys(keys: tuple[tuple[str, Secret], ...]) -> None:
    """Refuse to start with a weak or shared agent key; the message names the agent, never the key."""
    seen: dict[str, str] = {}
    for name, secret in keys:
        key = secret.reveal() or ""
        reason = weak_key_reason(key)
        if reason is not None:
            raise WeakAgentKeyError(
                f"AGENT_API_KEYS: the key of agent {name!r} is too weak: {reason}. "
                "Generate one with: python -c 'import secrets; print(secrets.token_urlsafe(24))'"
            )
        if key in seen:
            raise WeakAgentKeyError(f"AGENT_API_KEYS: agents {seen[key]!r} and {name!r} share one key; give each its own.")
        seen[key] = name


def _stripped(items: list[str]) -> tuple[str, ...]:
    """A list setting's entries, trimmed, without the empty ones."""
    return tuple(item.strip() for item in items if item.strip())


def _redis_url_from_parts(env: Env) -> str | None:
    """Build a URL from REDIS_HOST/PORT/PASSWORD/DB, the contract's alternative to REDIS_URL."""
    host = env.str("REDIS_HOST", None)
    if not host:
        return None
    port = env.int("REDIS_PORT", 6379)
    db = env.int("REDIS_DB", 0)
    password = env.str("REDIS_PASSWORD", None)
    auth = f":{password}@" if password else ""
    return f"redis://{auth}{host}:{port}/{db}"
