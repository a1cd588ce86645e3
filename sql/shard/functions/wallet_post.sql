-- Posts money: the one place balances and ledger entries are written, for
-- every movement (a group's transfers, through wallet_batch_apply; a
-- deposit's or a withdrawal's settling, from the shard agent).
--
-- One element per ledger entry, in order: the account (accounts.account_id),
-- the entry's kind, its signed amount (negative takes money out) and the
-- counterparty shown on it.
--
-- Rules owned here:
--   - One balance update per account for the whole call, by the sum of its
--     entries, and one ledger insert; each entry's balance_after runs in
--     entry order from the account's opening balance (a payee credited
--     several times in one group sees each step).
--   - p_fence (Redis mode; NULL otherwise) is the fencing token of the locks
--     the call runs under: every account it moves records it as its
--     last_fence (never lowering it), and every entry as its fence.
--   - Daily limits: what transfer_debit entries take out of an account counts
--     toward its usage of the UTC day (used_today, used_day), in the same
--     update as the balance, so a limit is consumed exactly when the debit
--     commits and a refused or aborted transfer consumes nothing. The day is
--     the transaction's (now()), as is its entries' created_at; a transaction
--     that began before midnight and reaches a row another transaction has
--     already moved to the new day leaves the new day's usage alone (its
--     entries are dated the day before).
--   - Holds: a 'hold' entry (negative) adds its amount to the account's held
--     money and a 'release' entry (positive) takes it off; neither moves the
--     balance, and their balance_after is the balance at their place in the
--     order.
--   - Events (the outbox, migration V20): every entry on a user's account
--     writes its event, and the event's row in event_outbox (not yet
--     published), in the same statement list, so both commit or roll back
--     with the entry; each user's outbox rows are numbered in seq order. The account's event_seq rises by its
--     entries in the balance update, under the row lock, and the entries take
--     the numbers in order: a user's seq has no gaps. p_about names the
--     transfer an entry is about (NULL: the entry's own transfer ID) and
--     p_event its event type (NULL: the entry's kind).
--   - It checks nothing: the caller holds the accounts' row locks and has
--     applied every rule (funds, currency, fence). A user account that would
--     still go negative is refused by the table's no_overdraft constraint, and
--     an entry whose account did not move by its NULL balance_after.
--   - Generic plans: every statement stays on its index whatever the arrays
--     hold.
CREATE OR REPLACE FUNCTION wallet_post(
    p_transfer uuid[], p_account uuid[], p_kind text[], p_amount numeric[],
    p_party text[], p_fence bigint, p_about uuid[] DEFAULT NULL, p_event text[] DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    n int := coalesce(array_length(p_transfer, 1), 0);
    v_accounts uuid[] := '{}';
    v_totals numeric[] := '{}';
    v_spent numeric[] := '{}';
    v_holds numeric[] := '{}';
    v_count bigint[] := '{}';
    v_today date := (now() AT TIME ZONE 'UTC')::date;
    v_moved uuid[];
    v_running numeric[];
    v_users uuid[];
    v_buckets int[];
    v_bucket int[] := array_fill(NULL::int, ARRAY[n]);
    v_currencies text[];
    v_seqs bigint[];
    v_user uuid[] := array_fill(NULL::uuid, ARRAY[n]);
    v_currency text[] := array_fill(NULL::text, ARRAY[n]);
    v_seq bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    v_balance numeric[] := array_fill(NULL::numeric, ARRAY[n]);
    v_at int;
    i int;
BEGIN
    FOR i IN 1..n LOOP
        v_at := array_position(v_accounts, p_account[i]);
        IF v_at IS NULL THEN
            v_accounts := v_accounts || p_account[i];
            v_totals := v_totals || 0::numeric;
            v_spent := v_spent || 0::numeric;
            v_holds := v_holds || 0::numeric;
            v_count := v_count || 0::bigint;
            v_at := cardinality(v_accounts);
        END IF;
        v_count[v_at] := v_count[v_at] + 1;
        IF p_kind[i] IN ('hold', 'release') THEN
            v_holds[v_at] := v_holds[v_at] - p_amount[i];
        ELSE
            v_totals[v_at] := v_totals[v_at] + p_amount[i];
        END IF;
        IF p_kind[i] = 'transfer_debit' THEN
            v_spent[v_at] := v_spent[v_at] - p_amount[i];
        END IF;
    END LOOP;
    WITH moved AS (
        UPDATE accounts a SET balance = a.balance + d.total,
                              held = a.held + d.holds,
                              last_fence = greatest(a.last_fence, p_fence),
                              used_today = CASE WHEN d.spent = 0 THEN a.used_today
                                                WHEN a.used_day = v_today THEN a.used_today + d.spent
                                                WHEN a.used_day > v_today THEN a.used_today
                                                ELSE d.spent END,
                              used_day = CASE WHEN d.spent = 0 OR a.used_day > v_today THEN a.used_day
                                              ELSE v_today END,
                              event_seq = a.event_seq + CASE WHEN a.kind = 'user' THEN d.events
                                                             ELSE 0 END
          FROM unnest(v_accounts, v_totals, v_spent, v_holds, v_count)
               AS d (id, total, spent, holds, events)
         WHERE a.account_id = d.id AND a.account_id = ANY (v_accounts)
        RETURNING a.account_id, a.balance - d.total AS opening, a.user_id, a.currency::text,
                  a.event_seq - d.events AS seq0, a.bucket
    )
    SELECT coalesce(array_agg(m.account_id), '{}'), coalesce(array_agg(m.opening), '{}'),
           coalesce(array_agg(m.user_id), '{}'), coalesce(array_agg(m.currency), '{}'),
           coalesce(array_agg(m.seq0), '{}'), coalesce(array_agg(m.bucket), '{}')
      INTO v_moved, v_running, v_users, v_currencies, v_seqs, v_buckets
      FROM moved AS m;
    FOR i IN 1..n LOOP
        v_at := array_position(v_moved, p_account[i]);
        CONTINUE WHEN v_at IS NULL;
        IF p_kind[i] NOT IN ('hold', 'release') THEN
            v_running[v_at] := v_running[v_at] + p_amount[i];
        END IF;
        v_balance[i] := v_running[v_at];
        IF v_users[v_at] IS NOT NULL THEN
            v_seqs[v_at] := v_seqs[v_at] + 1;
            v_seq[i] := v_seqs[v_at];
            v_user[i] := v_users[v_at];
            v_bucket[i] := v_buckets[v_at];
            v_currency[i] := v_currencies[v_at];
        END IF;
    END LOOP;
    INSERT INTO ledger_entries (account_id, transfer_id, kind, amount, balance_after, counterparty,
                                fence)
    SELECT p_account[x], p_transfer[x], p_kind[x], p_amount[x], v_balance[x], p_party[x], p_fence
      FROM generate_subscripts(p_transfer, 1) AS x
     ORDER BY x;
    INSERT INTO events (event_id, user_id, seq, type, transfer_id, amount, currency,
                        balance_after, counterparty)
    SELECT md5(p_transfer[x]::text || p_account[x]::text)::uuid, v_user[x], v_seq[x],
           coalesce(p_event[x], p_kind[x]), coalesce(p_about[x], p_transfer[x]), p_amount[x],
           v_currency[x], v_balance[x], p_party[x]
      FROM generate_subscripts(p_transfer, 1) AS x
     WHERE v_user[x] IS NOT NULL;
    INSERT INTO event_outbox (event_id, user_id, bucket)
    SELECT md5(p_transfer[x]::text || p_account[x]::text)::uuid, v_user[x], v_bucket[x]
      FROM generate_subscripts(p_transfer, 1) AS x
     WHERE v_user[x] IS NOT NULL
     ORDER BY v_user[x], v_seq[x];
END
$$;
