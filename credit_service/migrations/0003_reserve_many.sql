-- ReserveCredits for many reservations in one call and one transaction (BatchReserveCredits, and
-- ReserveCredits itself as a batch of one; docs/performance.md). Per item it does what
-- credit.reserve (0002) does, with one difference in how a refusal is found: the owner's account
-- row is locked (FOR UPDATE) and its available credits compared with the amount, so that one
-- item's refusal is an outcome of that item and not an error that would undo the whole batch.
-- That comparison is not a pre-check acted on later (DESIGN.md, failure class 1): the row stays
-- locked until this transaction ends, so nobody can move those credits in between, and the
-- accounts' CHECK (available >= 0) still refuses any hold the comparison would have let through.
--
-- Items are taken in the order of their owners, so that two batches (from two booking replicas)
-- lock accounts in the same order and never deadlock each other. An id given twice is refused by
-- the caller before this runs.
--
-- outcome per item (p_position is its index in the arrays, from 1):
--   'created'      the hold is new;
--   'existing'     a reservation with this id existed (an earlier or concurrent call): it is
--                  returned as it stands and the caller compares its owner, amount and reference;
--   'no_account'   the owner has no account (nothing held);
--   'insufficient' too few credits are available (nothing held; balance_available says how many).
-- The balance columns are p_owner's balance after the item (NULL with no account).
--
-- credit.reserve stays for replicas of the previous version during a rolling upgrade.

CREATE FUNCTION credit.reserve_many(
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

-- Room on each page for the next version of a row, so that updates can stay on the page (HOT:
-- no new index entries) when no indexed column changes: an account is updated by every reserve,
-- commit and release; a reservation's status changes are not HOT (status is in a partial index)
-- but its page still takes the new version. Applies to pages written from now on.
ALTER TABLE credit.accounts SET (fillfactor = 50);
ALTER TABLE credit.reservations SET (fillfactor = 80);
