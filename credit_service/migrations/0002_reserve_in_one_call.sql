-- ReserveCredits in one round trip (docs/performance.md): the same statements the service used
-- to send one by one inside a transaction, now in one function call, one implicit transaction.
-- The guarantees are unchanged and still the database's: the reservation's primary key makes the
-- hold idempotent, the ledger trigger moves the credits, and the accounts' CHECK refuses a hold
-- larger than what is available (raised from here as before, with the same constraint name, so
-- the service maps it as before). The balance is read after the hold, in the same transaction.
--
-- Returns the reservation as it stands (ours, or the one an earlier or concurrent call with the
-- same id made: the caller compares its parameters), whether this call created it, and the
-- balance of p_owner_id (NULLs when that owner has no account, possible only for a reused id).

CREATE FUNCTION credit.reserve(
    p_reservation_id uuid, p_owner_id uuid, p_amount bigint, p_reference text, p_ttl_s double precision
) RETURNS TABLE (
    reservation_id uuid, owner_id uuid, amount bigint, committed_amount bigint, refunded_amount bigint,
    status text, release_reason text, reference text, created_at timestamptz, updated_at timestamptz,
    expires_at timestamptz, created boolean,
    balance_available bigint, balance_held bigint, balance_spent bigint, balance_granted bigint,
    balance_updated_at timestamptz
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_created boolean := false;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM credit.reservations r WHERE r.reservation_id = p_reservation_id) THEN
        INSERT INTO credit.reservations (reservation_id, owner_id, amount, reference, expires_at)
        VALUES (p_reservation_id, p_owner_id, p_amount, p_reference, now() + make_interval(secs => p_ttl_s))
        ON CONFLICT (reservation_id) DO NOTHING;
        v_created := FOUND;
        IF v_created THEN
            INSERT INTO credit.ledger_entries
                (owner_id, kind, available_delta, held_delta, spent_delta, granted_delta, reservation_id)
            VALUES (p_owner_id, 'reserve', -p_amount, p_amount, 0, 0, p_reservation_id);
        END IF;
    END IF;
    -- A new statement sees what a concurrent call with the same id committed while we waited.
    RETURN QUERY
        SELECT r.reservation_id, r.owner_id, r.amount, r.committed_amount, r.refunded_amount, r.status,
               r.release_reason, r.reference, r.created_at, r.updated_at, r.expires_at, v_created,
               a.available, a.held, a.spent, a.granted, a.updated_at
          FROM credit.reservations r
          LEFT JOIN credit.accounts a ON a.owner_id = p_owner_id
         WHERE r.reservation_id = p_reservation_id;
END;
$$;
