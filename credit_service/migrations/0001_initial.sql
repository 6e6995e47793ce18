-- Credit accounts, an append-only ledger, and two-phase reservations.
--
-- Invariants, each backed by the database rather than by code alone:
--   * nothing is negative, and available + held + spent = granted      (CHECKs on accounts)
--   * the ledger sums to the balance: balances change only by inserting a ledger entry, whose
--     trigger applies its deltas; a direct UPDATE of a balance is refused (guard trigger)
--   * the ledger is append-only                                           (guard triggers)
--   * every entry conserves credits: the deltas of its buckets add up   (CHECK on entries)
--   * one reservation per id; amounts consistent with its state         (PK, CHECKs)
--   * one grant per request_id                                           (partial UNIQUE index)

CREATE TABLE credit.accounts (
    owner_id   uuid PRIMARY KEY,
    available  bigint NOT NULL DEFAULT 0,
    held       bigint NOT NULL DEFAULT 0,
    spent      bigint NOT NULL DEFAULT 0,
    granted    bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT accounts_available_nonnegative CHECK (available >= 0),
    CONSTRAINT accounts_held_nonnegative CHECK (held >= 0),
    CONSTRAINT accounts_spent_nonnegative CHECK (spent >= 0),
    CONSTRAINT accounts_granted_nonnegative CHECK (granted >= 0),
    CONSTRAINT accounts_balance_identity CHECK (available + held + spent = granted)
);

CREATE TABLE credit.reservations (
    reservation_id   uuid PRIMARY KEY,
    owner_id         uuid NOT NULL REFERENCES credit.accounts (owner_id),
    amount           bigint NOT NULL,
    committed_amount bigint NOT NULL DEFAULT 0,
    refunded_amount  bigint NOT NULL DEFAULT 0,
    status           text NOT NULL DEFAULT 'pending',
    release_reason   text,
    reference        text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    CONSTRAINT reservations_amount_positive CHECK (amount > 0),
    CONSTRAINT reservations_status_known CHECK (status IN ('pending', 'committed', 'released', 'refunded')),
    CONSTRAINT reservations_committed_within_amount CHECK (committed_amount BETWEEN 0 AND amount),
    CONSTRAINT reservations_refunded_within_committed CHECK (refunded_amount BETWEEN 0 AND committed_amount),
    CONSTRAINT reservations_release_reason_known CHECK (release_reason IN ('cancelled', 'expired')),
    -- The amounts and the release reason must agree with the state.
    CONSTRAINT reservations_state_shape CHECK (
        CASE status
            WHEN 'pending' THEN committed_amount = 0 AND refunded_amount = 0 AND release_reason IS NULL
            WHEN 'committed' THEN committed_amount > 0 AND refunded_amount = 0 AND release_reason IS NULL
            WHEN 'released' THEN committed_amount = 0 AND refunded_amount = 0 AND release_reason IS NOT NULL
            WHEN 'refunded' THEN committed_amount > 0 AND refunded_amount > 0 AND release_reason IS NULL
        END
    ),
    CONSTRAINT reservations_reference_length CHECK (length(reference) <= 200)
);

CREATE INDEX reservations_pending_expiry ON credit.reservations (expires_at) WHERE status = 'pending';
CREATE INDEX reservations_by_creation ON credit.reservations (created_at DESC, reservation_id DESC);
CREATE INDEX reservations_by_owner ON credit.reservations (owner_id, created_at DESC, reservation_id DESC);

CREATE TABLE credit.ledger_entries (
    entry_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id        uuid NOT NULL REFERENCES credit.accounts (owner_id),
    kind            text NOT NULL,
    available_delta bigint NOT NULL,
    held_delta      bigint NOT NULL,
    spent_delta     bigint NOT NULL,
    granted_delta   bigint NOT NULL,
    reservation_id  uuid REFERENCES credit.reservations (reservation_id),
    request_id      text,
    grant_kind      text,
    note            text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_entries_kind_known CHECK (kind IN ('grant', 'reserve', 'commit', 'release', 'refund')),
    CONSTRAINT ledger_entries_conserve CHECK (available_delta + held_delta + spent_delta = granted_delta),
    -- Each kind moves credits between exactly the buckets it names, in the right direction.
    CONSTRAINT ledger_entries_shape CHECK (
        CASE kind
            WHEN 'grant' THEN granted_delta > 0 AND available_delta = granted_delta
                AND held_delta = 0 AND spent_delta = 0
                AND request_id IS NOT NULL AND reservation_id IS NULL AND grant_kind IS NOT NULL
            WHEN 'reserve' THEN available_delta < 0 AND held_delta = -available_delta
                AND spent_delta = 0 AND granted_delta = 0 AND reservation_id IS NOT NULL
            WHEN 'commit' THEN held_delta < 0 AND spent_delta = -held_delta
                AND available_delta = 0 AND granted_delta = 0 AND reservation_id IS NOT NULL
            WHEN 'release' THEN held_delta < 0 AND available_delta = -held_delta
                AND spent_delta = 0 AND granted_delta = 0 AND reservation_id IS NOT NULL
            WHEN 'refund' THEN spent_delta < 0 AND available_delta = -spent_delta
                AND held_delta = 0 AND granted_delta = 0 AND reservation_id IS NOT NULL
        END
    ),
    CONSTRAINT ledger_entries_note_length CHECK (length(note) <= 500)
);

CREATE INDEX ledger_entries_by_owner ON credit.ledger_entries (owner_id, entry_id DESC);
CREATE INDEX ledger_entries_by_reservation ON credit.ledger_entries (reservation_id) WHERE reservation_id IS NOT NULL;
CREATE UNIQUE INDEX ledger_entries_one_grant_per_request ON credit.ledger_entries (request_id) WHERE kind = 'grant';

-- A ledger entry applies its deltas to the account, in the same statement: the balance is the
-- ledger's sum by construction, and the account's CHECKs refuse any entry that would make a
-- bucket negative (that refusal is how a reserve finds too few credits, atomically).
CREATE FUNCTION credit.apply_ledger_entry() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE credit.accounts
       SET available = available + NEW.available_delta,
           held = held + NEW.held_delta,
           spent = spent + NEW.spent_delta,
           granted = granted + NEW.granted_delta,
           updated_at = NEW.created_at
     WHERE owner_id = NEW.owner_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'ledger entry for unknown account %', NEW.owner_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER ledger_entries_apply AFTER INSERT ON credit.ledger_entries
    FOR EACH ROW EXECUTE FUNCTION credit.apply_ledger_entry();

CREATE FUNCTION credit.refuse_ledger_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only' USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON credit.ledger_entries
    FOR EACH ROW EXECUTE FUNCTION credit.refuse_ledger_change();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON credit.ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION credit.refuse_ledger_change();

-- Balances move only through the ledger trigger (trigger depth 2); a direct UPDATE or an INSERT
-- with a balance would let the two drift apart.
CREATE FUNCTION credit.guard_account_balance() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.available <> 0 OR NEW.held <> 0 OR NEW.spent <> 0 OR NEW.granted <> 0 THEN
            RAISE EXCEPTION 'accounts start empty; credits arrive through ledger entries'
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    ELSIF pg_trigger_depth() < 2 AND (NEW.available, NEW.held, NEW.spent, NEW.granted)
            IS DISTINCT FROM (OLD.available, OLD.held, OLD.spent, OLD.granted) THEN
        RAISE EXCEPTION 'balances change only through ledger entries'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER accounts_balance_guard BEFORE INSERT OR UPDATE ON credit.accounts
    FOR EACH ROW EXECUTE FUNCTION credit.guard_account_balance();
CREATE TRIGGER accounts_no_delete BEFORE DELETE OR TRUNCATE ON credit.accounts
    FOR EACH STATEMENT EXECUTE FUNCTION credit.refuse_ledger_change();
