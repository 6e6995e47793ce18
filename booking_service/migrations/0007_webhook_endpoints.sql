-- Webhook endpoints managed by admin RPCs, each with its own secret, retries, dead letters and a
-- delivery log (docs/notifications.md, "Webhook endpoints").
--
-- A booking still writes one outbox row per event and nothing per endpoint. The outbox worker
-- sends the event to every enabled endpoint subscribed to its type. An endpoint that fails (or
-- already has deliveries waiting) gets a row in webhook_deliveries for that event: its own
-- attempts, backoff and dead letter, independent of the event row and of every other endpoint.
-- Every attempt, first or retried, is logged in webhook_attempts, which the endpoint's partner
-- reads.

CREATE TABLE booking.webhook_endpoints (
    endpoint_id                 uuid PRIMARY KEY,
    request_id                  text NOT NULL UNIQUE,
    url                         text NOT NULL,
    description                 text NOT NULL DEFAULT '',
    event_types                 text[] NOT NULL,
    enabled                     boolean NOT NULL DEFAULT true,
    -- The subject of the partner's token that may read this endpoint's log ('' for none).
    partner_id                  text NOT NULL DEFAULT '',
    -- Standard Webhooks secrets ("whsec_" + base64). During a rotation's overlap the previous
    -- secret signs too, until previous_secret_expires_at.
    secret                      text NOT NULL,
    previous_secret             text,
    previous_secret_expires_at  timestamptz,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_endpoints_url_form CHECK (url ~ '^https?://' AND length(url) <= 2000),
    CONSTRAINT webhook_endpoints_event_types CHECK (cardinality(event_types) BETWEEN 1 AND 20),
    CONSTRAINT webhook_endpoints_description_length CHECK (length(description) <= 500),
    CONSTRAINT webhook_endpoints_partner_length CHECK (length(partner_id) <= 200),
    CONSTRAINT webhook_endpoints_previous_secret_shape
        CHECK ((previous_secret IS NULL) = (previous_secret_expires_at IS NULL))
);

CREATE INDEX webhook_endpoints_by_creation ON booking.webhook_endpoints (created_at, endpoint_id);

-- One event for one endpoint that did not go through at the first try (or was queued behind
-- earlier failures): retried with backoff on its own, dead after the outbox's maximum attempts.
-- The body is kept as sent, so every retry carries the same bytes.
CREATE TABLE booking.webhook_deliveries (
    delivery_id     uuid PRIMARY KEY,
    endpoint_id     uuid NOT NULL REFERENCES booking.webhook_endpoints (endpoint_id) ON DELETE CASCADE,
    event_id        uuid NOT NULL,
    event_type      text NOT NULL,
    body            text NOT NULL,
    status          text NOT NULL DEFAULT 'pending',
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- An event redelivered by the outbox (a worker died before writing its pass) finds its row.
    CONSTRAINT webhook_deliveries_once UNIQUE (endpoint_id, event_id),
    CONSTRAINT webhook_deliveries_status_known CHECK (status IN ('pending', 'delivered', 'dead')),
    CONSTRAINT webhook_deliveries_attempts_nonnegative CHECK (attempts >= 0),
    CONSTRAINT webhook_deliveries_error_length CHECK (length(last_error) <= 1000)
);

CREATE INDEX webhook_deliveries_due ON booking.webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_by_endpoint
    ON booking.webhook_deliveries (endpoint_id, updated_at DESC, delivery_id DESC);
CREATE INDEX webhook_deliveries_old ON booking.webhook_deliveries (updated_at) WHERE status = 'delivered';

-- Every attempt: what the endpoint answered and how long it took. Kept for
-- BOOKING_WEBHOOK_LOG_RETENTION_H, then deleted by the delivery worker.
CREATE TABLE booking.webhook_attempts (
    attempt_id   uuid PRIMARY KEY,
    endpoint_id  uuid NOT NULL REFERENCES booking.webhook_endpoints (endpoint_id) ON DELETE CASCADE,
    event_id     uuid NOT NULL,
    event_type   text NOT NULL,
    delivery_id  uuid,
    attempted_at timestamptz NOT NULL,
    http_status  integer,
    latency_ms   integer NOT NULL,
    succeeded    boolean NOT NULL,
    error        text,
    CONSTRAINT webhook_attempts_latency_nonnegative CHECK (latency_ms >= 0),
    CONSTRAINT webhook_attempts_error_length CHECK (length(error) <= 1000)
);

CREATE INDEX webhook_attempts_by_endpoint ON booking.webhook_attempts (endpoint_id, attempted_at DESC, attempt_id DESC);
CREATE INDEX webhook_attempts_old ON booking.webhook_attempts (attempted_at);
