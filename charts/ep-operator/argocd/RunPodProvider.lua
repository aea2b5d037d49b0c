-- Argo CD health of an ep.dev RunPodProvider: resource.customizations.health.ep.dev_RunPodProvider.
-- Reads the conditions the operator writes (Ready, Reconciling, Stalled; kstatus's meaning).
local hs = {status = "Progressing", message = "waiting for the operator to check this provider"}
local function condition(type_)
  if obj.status == nil or obj.status.conditions == nil then return nil end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == type_ then return c end
  end
  return nil
end
local function said(c)
  if c.message ~= nil and c.message ~= "" then return c.reason .. ": " .. c.message end
  return c.reason
end
local ready = condition("Ready")
if ready == nil then return hs end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "the operator has not yet observed generation " .. generation
  return hs
end
local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = said(stalled)
  return hs
end
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = said(ready)
  return hs
end
hs.message = said(ready)
return hs
