-- Two fixes to ReserveCredits (docs/design.md), and the function no supported version calls.
--
-- credit.reserve_many (0003) looked for an existing reservation before it locked the owner's
-- account. A concurrent call with the same reservation id (a retry of one booking on another
-- replica) that held the lock made the hold meanwhile, so the waiting call compared the balance
-- after that hold and answered INSUFFICIENT_CREDITS for a request whose hold exists. It now
-- looks again once it holds the lock. Everything else is as in 0003.
--
-- credit.reserve (0002) has been called by no version since 0003; the previous version, which may
-- run beside this one during a rolling upgrade, calls credit.reserve_many only.

DROP FUNCTION credit.reserve(uuid, uuid, bigint, text, double precision);

CREATE OR REPLACE FUNCTION credit.reserve_many(
    p_reservation_ids uuid[], p_owner_ids uuid[], p_amounts bigint[], p_references text[], p_ttl_s double precision
) RETURNS TABLE (
    item_position integer, outcome text,
    reservation_id uuid, owner_id uuid, amount bigint, committed_amount bigint, refunded_amount bigint,
    status text, release_reason text, reference text, created_at timestamptz, updated_at timestamptz,
    expires_at timestamptz,
    balance_available bigint, balance_held bigint, balance_spent bigint, balance_granted bigint,
    balance_updated_at timestamptz
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_item record;
    v_outcome text;
    v_available bigint;
BEGIN
    IF cardinality(p_reservation_ids) IS DISTINCT FROM cardinality(p_owner_ids)
       OR cardinality(p_reservation_ids) IS DISTINCT FROM cardinality(p_amounts)
       OR cardinality(p_reservation_ids) IS DISTINCT FROM cardinality(p_references) THEN
        RAISE EXCEPTION 'credit.reserve_many: the arrays differ in length' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_item IN
        SELECT i.position::integer AS position, i.reservation_id, i.owner_id, i.amount, i.reference
          FROM unnest(p_reservation_ids, p_owner_ids, p_amounts, p_references)
               WITH ORDINALITY AS i(reservation_id, owner_id, amount, reference, position)
         ORDER BY i.owner_id, i.reservation_id
    LOOP
        IF EXISTS (SELECT 1 FROM credit.reservations r WHERE r.reservation_id = v_item.reservation_id) THEN
            v_outcome := 'existing';
        ELSE
            SELECT a.available INTO v_available FROM credit.accounts a WHERE a.owner_id = v_item.owner_id FOR UPDATE;
            IF NOT FOUND THEN
                v_outcome := 'no_account';
            ELSIF EXISTS (SELECT 1 FROM credit.reservations r WHERE r.reservation_id = v_item.reservation_id) THEN
                -- A concurrent call with this id held the account's lock and made the hold while we
                -- waited for it: that hold is this item's (the first look above predates it).
                v_outcome := 'existing';
            ELSIF v_available < v_item.amount THEN
                v_outcome := 'insufficient';
            ELSE
                INSERT INTO credit.reservations (reservation_id, owner_id, amount, reference, expires_at)
                VALUES (v_item.reservation_id, v_item.owner_id, v_item.amount, v_item.reference,
                        now() + make_interval(secs => p_ttl_s))
                ON CONFLICT (reservation_id) DO NOTHING;
                IF FOUND THEN
                    v_outcome := 'created';
                    INSERT INTO credit.ledger_entries
                        (owner_id, kind, available_delta, held_delta, spent_delta, granted_delta, reservation_id)
                    VALUES (v_item.owner_id, 'reserve', -v_item.amount, v_item.amount, 0, 0, v_item.reservation_id);
                ELSE
                    v_outcome := 'existing';  -- a concurrent call with this id committed it first
                END IF;
            END IF;
        END IF;
        -- A new statement sees what a concurrent call with the same id committed while we waited.
        RETURN QUERY
            SELECT v_item.position, v_outcome,
                   r.reservation_id, r.owner_id, r.amount, r.committed_amount, r.refunded_amount, r.status,
                   r.release_reason, r.reference, r.created_at, r.updated_at, r.expires_at,
                   a.available, a.held, a.spent, a.granted, a.updated_at
              FROM (SELECT 1) AS one
              LEFT JOIN credit.reservations r ON r.reservation_id = v_item.reservation_id
              LEFT JOIN credit.accounts a ON a.owner_id = v_item.owner_id;
    END LOOP;
END;
$$;
