# Shared by scripts/kafka-local, scripts/hdfs-local and scripts/spark-cluster (sourced, not run): checks of
# values from the environment, the private data folder, and processes found through their pid files.
# The sourcing script sets `service` (its name in messages) and `root` first.

# Every variable used in arithmetic or passed to a command is checked first: a value from the
# environment is data, never shell code.
refuse() { echo "$service: $1" >&2; exit 2; }
port_number() { [[ "$1" =~ ^[0-9]{1,5}$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535)); }
# check_port NAME VALUE: VALUE as a port number, or refuse naming the variable NAME.
check_port() { port_number "$2" || refuse "$1 must be a port number (1-65535), not '$2'"; echo $((10#$2)); }
# check_size NAME VALUE: VALUE as a JVM memory size, or refuse naming the variable NAME.
check_size() { [[ "$2" =~ ^[0-9]+[kKmMgG]?$ ]] || refuse "$1 must be a JVM size such as 512m or 2g, not '$2'"; echo "$2"; }

# own_data_folder FOLDER VARIABLE: make FOLDER (mode 700); it holds pid files that `stop` trusts, so it
# must be the user's own and writable by nobody else.
own_data_folder() {
  (umask 077 && mkdir -p "$1")
  [ -O "$1" ] || refuse "$1 ($2) belongs to another user"
  case "$(stat -c %a "$1")" in
    *[2367]? | *[2367]) refuse "$1 ($2) is writable by other users; chmod 700 it" ;;
  esac
}

# alive_with PID_FILE ARGUMENT: the pid file names a live process whose command line has ARGUMENT
# (one that belongs to this data folder, not another process that got its pid since).
alive_with() {
  local pid command
  [ -f "$1" ] && pid=$(cat "$1") && [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  command=$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  grep -qxF "$2" <<<"$command"
}

# accepting PORT: something listens on 127.0.0.1:PORT.
accepting() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

java_bin() { echo "$("$root/scripts/java-home")/bin/java"; }

# end_process PID_FILE: SIGTERM, up to 30 s to end, then SIGKILL; the pid file is removed. Call it
# only after alive_with said the pid is ours.
end_process() {
  local pid
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$1"
}
