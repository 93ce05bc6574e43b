-- wrk script for `POST /predict`: one real JPEG per request, as a multipart upload in the field `images`
-- (the same bytes on the wire as `curl -F images=@photo.jpg`). Run by bench/wrkgen.py:
--
--   wrk -t2 -c64 -d12s -s bench/wrk/predict.lua http://127.0.0.1:3000 -- IMAGE_DIR COUNT 2
--
-- IMAGE_DIR holds 0.jpg .. COUNT-1.jpg. Every body is built once per thread in init(), so request() is a
-- table lookup and the generator spends its CPU on sockets, not on Lua. Each thread starts at its own
-- offset and cycles through all the images, so concurrent requests carry different photos.
-- done() prints one line `WRK_JSON {...}`: latency percentiles (microseconds), counts, and the answers
-- that were not a 2xx with a prediction list (wrk itself only counts statuses above 399).

local BOUNDARY = "refit-bench-boundary"
local threads = {}
local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

local bodies = {}
local cursor = 1
non2xx = 0
bad_body = 0
statuses = {}

local function read(path)
   local f = assert(io.open(path, "rb"), "cannot open " .. path)
   local data = f:read("*a")
   f:close()
   return data
end

function init(args)
   local dir, count = args[1], tonumber(args[2])
   assert(dir and count and count > 0, "usage: -- IMAGE_DIR COUNT THREADS")
   local headers = {["Content-Type"] = "multipart/form-data; boundary=" .. BOUNDARY}
   for i = 0, count - 1 do
      local name = i .. ".jpg"
      local body = "--" .. BOUNDARY .. "\r\n"
         .. 'Content-Disposition: form-data; name="images"; filename="' .. name .. '"\r\n'
         .. "Content-Type: image/jpeg\r\n\r\n" .. read(dir .. "/" .. name) .. "\r\n--" .. BOUNDARY .. "--\r\n"
      bodies[#bodies + 1] = wrk.format("POST", "/predict", headers, body)
   end
   -- Rotate: thread k of THREADS starts k/THREADS of the way through the list.
   local threads_n = tonumber(args[3]) or 1
   cursor = math.floor((tonumber(id) or 0) * #bodies / threads_n) % #bodies + 1
end

function request()
   local r = bodies[cursor]
   cursor = cursor % #bodies + 1
   return r
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      statuses[tostring(status)] = (statuses[tostring(status)] or 0) + 1
   elseif body:sub(1, 1) ~= "[" or not body:find('"version"', 1, true) then
      bad_body = bad_body + 1
   end
end

local function json_counts(t)
   local parts = {}
   for k, v in pairs(t) do parts[#parts + 1] = string.format('"%s": %d', k, v) end
   return "{" .. table.concat(parts, ", ") .. "}"
end

function done(summary, latency, requests)
   local n2, bad, codes = 0, 0, {}
   for _, thread in ipairs(threads) do
      n2 = n2 + (thread:get("non2xx") or 0)
      bad = bad + (thread:get("bad_body") or 0)
      for code, count in pairs(thread:get("statuses") or {}) do codes[code] = (codes[code] or 0) + count end
   end
   local e = summary.errors
   local pct = {}
   for _, q in ipairs({50, 90, 95, 99}) do pct[#pct + 1] = string.format('"p%d_us": %d', q, latency:percentile(q)) end
   io.write(string.format('WRK_JSON {"duration_us": %d, "requests": %d, "bytes": %d, "non2xx": %d, '
      .. '"bad_body": %d, "statuses": %s, "connect": %d, "read": %d, "write": %d, "timeout": %d, '
      .. '"status_over_399": %d, "min_us": %d, "max_us": %d, "mean_us": %.1f, %s}\n',
      summary.duration, summary.requests, summary.bytes, n2, bad, json_counts(codes), e.connect, e.read,
      e.write, e.timeout, e.status, latency.min, latency.max, latency.mean, table.concat(pct, ", ")))
end
