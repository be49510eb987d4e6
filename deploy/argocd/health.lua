-- Argo CD health for leanserve.io/CompressedModel, from the conditions kstatus (Flux) reads:
-- observedGeneration behind metadata.generation: Progressing; Stalled=True: Degraded (kstatus
-- Failed); Ready=True: Healthy; phase Degraded: Degraded (kstatus: InProgress, Reconciling,
-- while the Deployment controller replaces replicas); otherwise Progressing (Reconciling=True).
-- Kept in this file so it can be tested with lua5.4; argocd-cm.yaml embeds the same text.
local hs = {}
hs.status = "Progressing"
hs.message = "Waiting for the operator"
if obj.status == nil then
  return hs
end
local generation = obj.metadata and obj.metadata.generation or 0
local observed = obj.status.observedGeneration or 0
if observed < generation then
  hs.message = "The operator has not yet observed generation " .. tostring(generation)
  return hs
end
local ready = nil
local stalled = nil
local reconciling = nil
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then
      ready = c
    elseif c.type == "Stalled" and c.status == "True" then
      stalled = c
    elseif c.type == "Reconciling" and c.status == "True" then
      reconciling = c
    end
  end
end
local phase = obj.status.phase or "Pending"
if stalled ~= nil then
  hs.status = "Degraded"
  hs.message = stalled.message or stalled.reason or phase
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or phase
  return hs
end
if (ready ~= nil and ready.reason == "InvalidSpec") or phase == "Failed" or phase == "Degraded" then
  hs.status = "Degraded"
  hs.message = (ready ~= nil and ready.message) or phase
  return hs
end
hs.message = (reconciling ~= nil and reconciling.message) or (ready ~= nil and ready.message)
  or phase
return hs
