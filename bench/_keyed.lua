-- Keyed traffic for wrk (bench/_traffic.py): each request asks for /<variant>/t<tenant>/<item>,
-- a warm key chosen uniformly at random, or with probability fresh_share a key never asked for
-- before (the same choice as bench/_loadgen.py's KeyedPaths).
-- Arguments (after wrk's --): variant, tenants, items, fresh_share, a seed, a tag unique to the run.
local variant, tenants, items, fresh_share, tag
local fresh = 0

function init(args)
  variant = args[1]
  tenants = tonumber(args[2])
  items = tonumber(args[3])
  fresh_share = tonumber(args[4])
  math.randomseed(tonumber(args[5]))
  tag = args[6]
end

function request()
  local tenant = math.random(0, tenants - 1)
  local item
  if fresh_share > 0 and math.random() < fresh_share then
    fresh = fresh + 1
    item = tag .. "-" .. fresh
  else
    item = math.random(0, items - 1)
  end
  return wrk.format("GET", "/" .. variant .. "/t" .. tenant .. "/" .. item)
end
