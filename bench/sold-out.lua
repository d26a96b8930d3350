-- wrk script for the sold-out rejection rate: one fixed request, built once by
-- wrk (no Lua per request, so the client spends its CPU on sending, not on
-- Lua). Once a worker has seen the promotion sold out it answers from
-- memory: this customer is not among the holders it loaded, so 410 (a
-- holder would get its coupon, 200).
-- Usage: wrk -s bench/sold-out.lua URL
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"customerId":"late-customer"}'
