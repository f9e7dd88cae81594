-- Moves a request's model throttles to a fallback model: takes one request and the tokens
-- there, or nothing; on success gives the failed model its tokens back.
-- KEYS: 1 new model rpm, 2 new model tpm, 3 old model tpm
-- ARGV: 1 new rpm, 2 new tpm, 3 old tpm limit, 4 tokens, 5 old model tokens
-- Returns {0} moved, or {reason (4 rpm, 5 tpm), retry_us}.
local new_rpm, new_tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
local ok_r, rpm_tat = gcra_try(KEYS[1], new_rpm, 1)
if not ok_r then return {4, rpm_tat} end
local ok_t, tpm_tat = gcra_try(KEYS[2], new_tpm, tokens)
if not ok_t then return {5, tpm_tat} end
if rpm_tat then write(KEYS[1], rpm_tat, 'tat') end
if tpm_tat then write(KEYS[2], tpm_tat, 'tat') end
gcra_refund(KEYS[3], tonumber(ARGV[3]), tonumber(ARGV[5]))
commit()
return {0}
