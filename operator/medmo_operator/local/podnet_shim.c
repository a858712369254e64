/* LD_PRELOAD shim giving each locally run pod its own loopback address and port space.
 *
 * Environment (set by medmo_operator.local.network):
 *   MEDMO_POD_IP         the pod's address, 127.x.y.z
 *   MEDMO_POD_PORTS_DIR  a directory shared by the pod's processes; one empty file per bound port
 *
 * bind():    a wildcard (0.0.0.0, ::) or localhost (127.0.0.1, ::1) address becomes the pod's
 *            address (::ffff:<pod ip> on dual-stack IPv6 sockets), so two pods can listen on one
 *            port; the port is recorded in MEDMO_POD_PORTS_DIR.
 * connect(): to localhost on a port some process of this pod listens on goes to the pod's
 *            address, so "localhost" still reaches the pod's own servers; every other localhost
 *            port is the host's (the S3 server, the API server), as the pods need.
 * getaddrinfo(): nss_wrapper answers EAI_ADDRFAMILY where glibc answers EAI_NONAME for a name
 *            with no address of the asked family; clients such as torch's TCPStore only move on
 *            from an IPv6 lookup to IPv4 on glibc's answer, so it is translated.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

typedef int (*addr_call)(int, const struct sockaddr *, socklen_t);
typedef int (*gai_call)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

static int pod_address(struct in_addr *out) {
  const char *ip = getenv("MEDMO_POD_IP");
  return ip && inet_pton(AF_INET, ip, out) == 1;
}

static int is_v4_local(struct in_addr a) {
  return a.s_addr == htonl(INADDR_ANY) || a.s_addr == htonl(INADDR_LOOPBACK);
}

static int is_v6_local(const struct in6_addr *a) {
  if (IN6_IS_ADDR_UNSPECIFIED(a) || IN6_IS_ADDR_LOOPBACK(a)) return 1;
  if (IN6_IS_ADDR_V4MAPPED(a)) {
    struct in_addr v4;
    memcpy(&v4, &a->s6_addr[12], 4);
    return v4.s_addr == htonl(INADDR_LOOPBACK);
  }
  return 0;
}

static int v6_only(int fd) {
  int on = 0;
  socklen_t len = sizeof on;
  return getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, &len) == 0 && on;
}

static void map_v4(struct in6_addr *a, struct in_addr v4) {
  memset(a, 0, sizeof *a);
  a->s6_addr[10] = 0xff;
  a->s6_addr[11] = 0xff;
  memcpy(&a->s6_addr[12], &v4, 4);
}

static int port_path(int fd, unsigned port, char *out, size_t size) {
  const char *dir = getenv("MEDMO_POD_PORTS_DIR");
  int type = 0;
  socklen_t len = sizeof type;
  if (!dir || getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) return 0;
  return snprintf(out, size, "%s/%s-%u", dir, type == SOCK_DGRAM ? "udp" : "tcp", port) < (int)size;
}

static void record_port(int fd) {
  struct sockaddr_storage bound;
  socklen_t len = sizeof bound;
  char path[PATH_MAX];
  unsigned port;
  if (getsockname(fd, (struct sockaddr *)&bound, &len) != 0) return;
  port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                           : ((struct sockaddr_in *)&bound)->sin_port);
  if (port_path(fd, port, path, sizeof path)) {
    int saved = errno, f = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
    if (f >= 0) close(f);
    errno = saved;
  }
}

static int pod_listens(int fd, unsigned port) {
  char path[PATH_MAX];
  struct stat st;
  return port_path(fd, port, path, sizeof path) && stat(path, &st) == 0;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static addr_call real_bind;
  struct in_addr pod;
  int rc;
  if (!real_bind) real_bind = (addr_call)dlsym(RTLD_NEXT, "bind");
  if (!addr || !pod_address(&pod)) return real_bind(fd, addr, len);
  if (addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
    struct sockaddr_in a;
    memcpy(&a, addr, sizeof a);
    if (!is_v4_local(a.sin_addr)) return real_bind(fd, addr, len);
    a.sin_addr = pod;
    rc = real_bind(fd, (struct sockaddr *)&a, sizeof a);
  } else if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 a;
    memcpy(&a, addr, sizeof a);
    /* An IPv6-only socket cannot take an IPv4 address; it keeps the host's (shared) one. */
    if (!is_v6_local(&a.sin6_addr) || v6_only(fd)) return real_bind(fd, addr, len);
    map_v4(&a.sin6_addr, pod);
    rc = real_bind(fd, (struct sockaddr *)&a, sizeof a);
  } else {
    return real_bind(fd, addr, len);
  }
  if (rc == 0) record_port(fd);
  return rc;
}

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
  static addr_call real_connect;
  struct in_addr pod;
  if (!real_connect) real_connect = (addr_call)dlsym(RTLD_NEXT, "connect");
  if (!addr || !pod_address(&pod)) return real_connect(fd, addr, len);
  if (addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
    struct sockaddr_in a;
    memcpy(&a, addr, sizeof a);
    if (a.sin_addr.s_addr == htonl(INADDR_LOOPBACK) && pod_listens(fd, ntohs(a.sin_port))) {
      a.sin_addr = pod;
      return real_connect(fd, (struct sockaddr *)&a, sizeof a);
    }
  } else if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 a;
    memcpy(&a, addr, sizeof a);
    if (is_v6_local(&a.sin6_addr) && !IN6_IS_ADDR_UNSPECIFIED(&a.sin6_addr) && !v6_only(fd) &&
        pod_listens(fd, ntohs(a.sin6_port))) {
      map_v4(&a.sin6_addr, pod);
      return real_connect(fd, (struct sockaddr *)&a, sizeof a);
    }
  }
  return real_connect(fd, addr, len);
}

/* One addrinfo node with its address in the same allocation, as glibc's freeaddrinfo expects. */
static struct addrinfo *mapped_node(const struct addrinfo *v4) {
  struct addrinfo *ai = calloc(1, sizeof *ai + sizeof(struct sockaddr_in6));
  struct sockaddr_in6 *a6;
  if (!ai) return NULL;
  a6 = (struct sockaddr_in6 *)(ai + 1);
  a6->sin6_family = AF_INET6;
  a6->sin6_port = ((const struct sockaddr_in *)v4->ai_addr)->sin_port;
  map_v4(&a6->sin6_addr, ((const struct sockaddr_in *)v4->ai_addr)->sin_addr);
  ai->ai_flags = v4->ai_flags;
  ai->ai_family = AF_INET6;
  ai->ai_socktype = v4->ai_socktype;
  ai->ai_protocol = v4->ai_protocol;
  ai->ai_addrlen = sizeof *a6;
  ai->ai_addr = (struct sockaddr *)a6;
  return ai;
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res) {
  static gai_call real_getaddrinfo;
  struct addrinfo v4_hints, *v4, *p, **tail;
  int rc;
  if (!real_getaddrinfo) real_getaddrinfo = (gai_call)dlsym(RTLD_NEXT, "getaddrinfo");
  rc = real_getaddrinfo(node, service, hints, res);
  if (rc == 0 || !node || !hints || hints->ai_family != AF_INET6 || !(hints->ai_flags & AI_V4MAPPED))
    return rc == EAI_ADDRFAMILY ? EAI_NONAME : rc;
  /* nss_wrapper ignores AI_V4MAPPED; glibc answers with the IPv4 addresses mapped into IPv6. */
  v4_hints = *hints;
  v4_hints.ai_family = AF_INET;
  v4_hints.ai_flags &= ~(AI_V4MAPPED | AI_ALL);
  if (real_getaddrinfo(node, service, &v4_hints, &v4) != 0) return EAI_NONAME;
  *res = NULL;
  tail = res;
  for (p = v4; p; p = p->ai_next) {
    if (p->ai_family != AF_INET || !(*tail = mapped_node(p))) continue;
    tail = &(*tail)->ai_next;
  }
  freeaddrinfo(v4);
  return *res ? 0 : EAI_NONAME;
}
