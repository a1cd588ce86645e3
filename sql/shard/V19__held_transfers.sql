-- Held transfers: a transfer a fraud rule with the action 'review' met is
-- accepted as held. Its amount is held on the payer's account (a 'hold'
-- entry), it reaches nobody, and an admin releases it (it commits, under
-- its own ID) or rejects it; a hold nobody decides expires. A rejected or
-- expired one is aborted with transfer_rejected or hold_expired, and its
-- hold released.
ALTER TABLE transfers DROP CONSTRAINT transfers_state_check;
ALTER TABLE transfers ADD CONSTRAINT transfers_state_check
    CHECK (state IN ('preparing', 'committed', 'aborted', 'held'));
-- Expiry reads held transfers by age.
CREATE INDEX transfers_held ON transfers (created_at) WHERE state = 'held';
