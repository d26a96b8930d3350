-- wrk script for the sold-out rejection rate: one fixed request, built once by
-- wrk (no Lua per request, so the client spends its CPU on sending, not on
-- Lua). The customer id does not matter here: once a worker has seen the
-- promotion sold out it answers 410 from memory for every customer.
-- Usage: wrk -s bench/sold-out.lua URL
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"customerId":"late-customer"}'
