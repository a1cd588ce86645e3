-- A deposit asks its payment provider without holding any lock, so something
-- else must keep recovery from settling the same deposit while the request is
-- still waiting on that call (the provider may answer the second asker "busy",
-- which would abort a deposit it then approves). The settler that is about to
-- call takes a lease; recovery lists only deposits whose lease ran out.
ALTER TABLE transfers ADD COLUMN settle_lease_until timestamptz;
