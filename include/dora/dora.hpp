#pragma once
/// \file dora.hpp
/// Umbrella header: LoRA and DoRA adapter layers on Eigen.

#include "base_layer.hpp"
#include "config.hpp"
#include "conv.hpp"
#include "dora_linear.hpp"
#include "embedding.hpp"
#include "init.hpp"
#include "lora_linear.hpp"
#include "magnitude.hpp"
#include "multi_adapter.hpp"
#include "optim.hpp"
#include "row_norm.hpp"
#include "storage.hpp"
#include "version.hpp"
