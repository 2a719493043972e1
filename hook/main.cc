// shimlet-hook: OCI runtime hook (createRuntime/poststop); see hook/hook.h.
#include "hook/hook.h"

int main(int argc, char** argv) { return shimlet::hook::main(argc, argv); }
