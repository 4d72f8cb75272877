-- Fleet-wide analytics read every team's conversations created in a time range. Rows arrive
-- roughly in creation order, so a BRIN index on created_at (a few pages for millions of rows)
-- lets such a scan skip the blocks outside the range; per-team analytics use the covering
-- conversations_team_analytics_idx instead.
CREATE INDEX conversations_created_brin ON conversations USING brin (created_at);
